"""Edit generalization: a knowledge-editing metric (hf-knowedit), as an `evaluate` module.

Load it offline with `evaluate.load("evaluate_metrics/edit_generalization")`. The computation is
`hf_knowedit.metrics.edit_generalization`, so the module and the library function give the same numbers.
"""

import evaluate

from hf_knowedit.metrics import edit_generalization, evaluate_features


_DESCRIPTION = """
Edit success on paraphrases of the edit prompt (rephrase prompts), against `target_new`.

Protocols (pass `protocol=` to `compute`):

- `token_accuracy` (EasyEdit): the prompt is followed by the answer (teacher forcing); an example scores the fraction
  of answer tokens that are the model's argmax prediction at their position. Inputs: token-id lists.
- `prob_comparison` (ROME): an example scores 1 when the mean per-token log-probability of the answer that should win
  is strictly larger than that of the answer that should lose, else 0. Inputs: floats.
- `exact_match`: an example scores 1 when the greedy continuation, whitespace-normalised (stripped, runs of
  whitespace collapsed to one space), starts with an accepted answer, normalised the same way, followed by the end of
  the text or a character that is not a letter or digit; any alias in a list counts. Inputs: strings.

The score is the mean over examples. The result always names its protocol.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, as for edit_reliability, on the rephrase prompts.
    references: per example, as for edit_reliability.
    protocol (`str`): `token_accuracy` (default), `prob_comparison` or `exact_match`.
    ignore_case (`bool`): `exact_match` only, casefold both sides.
Returns:
    score (`float`): the mean of the example scores.
    protocol (`str`): the protocol the score was computed with.
    num_examples (`int`): the number of examples.
    scores (`list[float]`): the example scores.
Examples:
    >>> metric = evaluate.load("evaluate_metrics/edit_generalization")
    >>> metric.compute(predictions=[-0.5, -2.0], references=[-1.0, -1.0], protocol="prob_comparison")["score"]
    0.5
"""

_CITATION = """
@article{zhang2024comprehensive,
  title={A Comprehensive Study of Knowledge Editing for Large Language Models},
  author={Zhang, Ningyu and Yao, Yunzhi and Tian, Bozhong and Wang, Peng and Deng, Shumin and Wang, Mengru and Xi,
  Zekun and Mao, Shengyu and Zhang, Jintian and Ni, Yuansheng and others},
  journal={arXiv preprint arXiv:2401.01286},
  year={2024}
}
@inproceedings{yao2023editing,
  title={Editing Large Language Models: Problems, Methods, and Opportunities},
  author={Yao, Yunzhi and Wang, Peng and Tian, Bozhong and Cheng, Siyuan and Li, Zhoubo and Deng, Shumin and Chen,
  Huajun and Zhang, Ningyu},
  booktitle={EMNLP},
  year={2023}
}
@inproceedings{meng2022locating,
  title={Locating and Editing Factual Associations in {GPT}},
  author={Meng, Kevin and Bau, David and Andonian, Alex and Belinkov, Yonatan},
  booktitle={NeurIPS},
  year={2022}
}
"""



@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EditGeneralization(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=evaluate_features(),
            reference_urls=["https://github.com/zjunlp/EasyEdit", "https://github.com/kmeng01/rome"],
        )

    def _compute(self, predictions, references, protocol="token_accuracy", ignore_case=False):
        return edit_generalization(predictions, references, protocol=protocol, ignore_case=ignore_case)
