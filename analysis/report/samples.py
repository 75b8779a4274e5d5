"""n of a group: samples per task and in total, as its records state them, and the runs scored on
another number of samples."""

from __future__ import annotations

from .. import results


def group_samples(records: list[dict], baseline: dict | None = None) -> dict:
    """n of a group: ``per_task`` ({task: samples}, None if the records do not say), ``total``, ``limit``,
    ``tasks`` and ``differing`` (labels of ok runs whose n is not the group's)."""
    ok = [r for r in records if r.get("status") == "ok"]
    reference = next((r for r in ok if baseline and r.get("path") == baseline.get("path")), ok[0] if ok else None)
    per_task = (reference or {}).get("n_per_task") or None
    total = (reference or {}).get("n_samples")
    if total is None and per_task:
        total = sum(per_task.values())
    differing = sorted({results.record_variant(r)["label"] for r in ok if _n_differs(r, per_task, total)})
    first = records[0] if records else {}
    return {"per_task": per_task, "total": total, "limit": first.get("limit"),
            "tasks": results.sample_key(first)[2] or tuple(sorted(per_task or ())), "differing": differing}


def _n_differs(record: dict, per_task: dict | None, total) -> bool:
    if per_task and record.get("n_per_task") and record["n_per_task"] != per_task:
        return True
    return total is not None and record.get("n_samples") is not None and record["n_samples"] != total


def samples_text(samples: dict, short: bool = False) -> str:
    """``n = 10 per task × 4 tasks = 40 samples`` (or what the records allow to say)."""
    per_task, total, tasks = samples["per_task"], samples["total"], samples["tasks"] or ()
    if per_task and len(set(per_task.values())) == 1:
        each = next(iter(per_task.values()))
        return f"n = {each}/task × {len(per_task)} tasks = {total}" if short else \
            f"n = {each} samples per task × {len(per_task)} tasks = {total} samples"
    if per_task:
        return f"n = {total} samples" if short else \
            f"n = {total} samples ({', '.join(f'{t} {k}' for t, k in sorted(per_task.items()))})"
    if total is None:
        return "n unknown"
    if short:
        return f"n = {total} samples"
    detail = [f"{len(tasks)} tasks"] if tasks else []
    if samples["limit"] is not None:
        detail.append(f"limit {samples['limit']} per task")
    return f"n = {total} samples in total" + (f" ({', '.join(detail)})" if detail else "")
