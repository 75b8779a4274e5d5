"""An lmms-eval model that answers every request with the doc's own answer (or a fixed wrong one), checking the
visuals its task hands it: drives a task end to end through lmms-eval's ``simple_evaluate`` without a network."""

from __future__ import annotations

from lmms_eval.api.model import lmms


class Oracle(lmms):
    """``wrong``: answer ``wrong_answer`` instead of ``doc["answer"]``; ``check(visuals)`` asserts on each doc's
    ``doc_to_visual`` output."""

    is_simple = True

    def __init__(self, wrong: bool, check, wrong_answer: str = "#"):
        super().__init__()
        self.wrong, self.check, self.wrong_answer = wrong, check, wrong_answer

    @property
    def device(self):
        return "cpu"

    def generate_until(self, requests):
        out = []
        for request in requests:
            _, _, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            self.check(doc_to_visual(doc))
            out.append(self.wrong_answer if self.wrong else doc["answer"])
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def generate_until_multi_round(self, requests):
        raise NotImplementedError
