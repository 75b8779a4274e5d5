"""Groups: the runs a report section compares, scored on the same samples against the same baseline
record; per group its baseline, its duplicates and the one record drawn per variant label."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from .. import results
from .samples import group_samples, samples_text


@dataclass
class Group:
    """Runs scored on the same samples against the same baseline record: the only runs a table, a
    figure, a Pareto front or a summary compares. ``records`` in report order, duplicates included."""

    model: str | None
    eval: str | None
    tasks: tuple | None
    limit: int | None
    blind: bool
    seed: int | None
    baseline_hash: str | None
    records: list[dict]

    @property
    def key(self) -> tuple:
        return (self.model, self.eval, self.tasks, self.limit, self.blind, self.seed, self.baseline_hash)

    @cached_property
    def table(self):
        """Every record of the group (:func:`analysis.results.records_table`), duplicates included."""
        return results.records_table(self.records)

    @cached_property
    def drawn(self):
        """The rows the summary and the figures use: per variant label the latest finished ``ok`` record."""
        return latest_per_label(self.table)

    @cached_property
    def duplicates(self) -> dict[str, int]:
        """Variant label -> number of records, for labels with more than one record in the group."""
        return duplicate_labels(self.table)

    @property
    def title(self) -> str:
        text = f"{self.model} on {self.eval}" + (" (blind)" if self.blind else "")
        if self.limit is not None:
            text += f", limit {self.limit}"
        if self.seed is not None:
            text += f", seed {self.seed}"
        return text

    @cached_property
    def baseline(self) -> dict | None:
        """The baseline the group's relative scores use (see :func:`group_baseline`)."""
        return group_baseline(self.records, self.baseline_hash)

    @cached_property
    def samples(self) -> dict:
        """n of the group (see :func:`group_samples`)."""
        return group_samples(self.records, self.baseline)

    def n_text(self, short: bool = False) -> str:
        return samples_text(self.samples, short=short)

    @cached_property
    def code_states(self) -> dict[str, int]:
        """The code the group's finished (``ok``) records were computed from (:func:`code_state`) -> how many."""
        states = Counter(code_state(record) for record in self.records if record.get("status") == "ok")
        return dict(sorted(states.items()))


def code_state(record: dict) -> str:
    """A record's code: its commit (10 characters), ``"... with local changes"`` when the tracked tree had some;
    ``"unrecorded"`` when the record names no commit (outside a git checkout, or an older record)."""
    commit = record.get("git_commit")
    if not commit:
        return "unrecorded"
    return f"`{commit[:10]}`" + (" with local changes" if record.get("git_dirty") else "")


def group_records(records: list[dict]) -> list[Group]:
    """Split records into :class:`Group` s by the group key: model, eval, tasks, limit, blind, seed (what
    decides the samples, :func:`analysis.results.sample_key`) and the baseline record the relative scores
    were computed against (:func:`analysis.results.baseline_hash`; a retrained model has another).

    A record that names no baseline (a failed run) joins the one group with its samples, if there is
    exactly one; otherwise it forms a group of its own ("baseline unknown")."""
    keyed: dict[tuple, list[dict]] = {}
    for record in records:
        keyed.setdefault((*results.sample_key(record), results.baseline_hash(record)), []).append(record)
    for key in [k for k in keyed if k[-1] is None]:
        homes = [k for k in keyed if k[:-1] == key[:-1] and k[-1] is not None]
        if len(homes) == 1:
            keyed[homes[0]] += keyed.pop(key)
    ordered = sorted(keyed, key=_group_order)
    return [Group(*key, records=sorted(keyed[key], key=_record_order)) for key in ordered]


def _group_order(key: tuple):
    return tuple((value is None, value if isinstance(value, (int, float)) else str(value)) for value in key)


def _record_order(record: dict):
    return (results.sort_key(record), record.get("finished_at") or "", record.get("path") or "")


def group_baseline(records: list[dict], baseline_hash: str | None) -> dict | None:
    """The baseline of a group: its own record when the group holds it (``found``: True), else what the
    variants' records say of it (``baseline``: score, scores, latency, path); None if neither."""
    own = [r for r in records if baseline_hash and r.get("config_hash") == baseline_hash and r.get("status") == "ok"]
    if own:
        r = own[-1]
        return {"config_hash": baseline_hash, "path": r.get("path"), "score": r.get("score"),
                "scores": r.get("scores") or {}, "latency": results.record_latency(r), "found": True}
    for r in records:
        ref = r.get("baseline")
        if isinstance(ref, dict) and ref.get("config_hash") == baseline_hash and baseline_hash:
            return {"config_hash": baseline_hash, "path": ref.get("path"), "score": ref.get("score"),
                    "scores": ref.get("scores") or {}, "latency": results.record_latency(ref), "found": False}
    return None


def latest_per_label(table):
    """One row per variant label: the latest finished ``ok`` record (rows in table order)."""
    ok = table[table["status"] == "ok"]
    by_finish = ok.assign(_finished=ok["finished_at"].fillna("").astype(str)).sort_values("_finished", kind="stable")
    keep = set(by_finish.drop_duplicates("label", keep="last").index)
    return ok[[index in keep for index in ok.index]]


def duplicate_labels(table) -> dict[str, int]:
    """Variant label -> count, for labels with more than one record in ``table``."""
    if table.empty:
        return {}
    counts = table["label"].value_counts()
    return {label: int(n) for label, n in sorted(counts.items()) if n > 1}


def group_headings(groups: list[Group]) -> list[str]:
    """Each group's title, with its baseline's hash where two groups would otherwise read alike."""
    titles = [g.title for g in groups]
    return [t if titles.count(t) == 1 else f"{t}, baseline `{(g.baseline_hash or 'unknown')[:10]}`"
            for t, g in zip(titles, groups)]
