"""Edit locality: a knowledge-editing metric (hf-knowedit), as an `evaluate` module.

Load it offline with `evaluate.load("evaluate_metrics/edit_locality")`. The computation is
`hf_knowedit.metrics.edit_locality`, so the module and the library function give the same numbers.
"""

import evaluate

from hf_knowedit.metrics import edit_locality, evaluate_features


_DESCRIPTION = """
Whether prompts unrelated to the edit are left alone. Two variants (`variant=`):

- `unchanged` (default): the post-edit output agrees with the pre-edit output on the locality prompt.
  `token_accuracy`: predictions/references are the post-/pre-edit teacher-forced argmax token ids (teacher-forced on
  the locality answer), scored as the fraction of agreeing positions (EasyEdit). `prob_comparison`:
  predictions/references are the post-/pre-edit margins log P(locality answer) - log P(target_new); 1 when the
  margin keeps its sign. `exact_match`: predictions/references are post-/pre-edit greedy continuations; 1 when equal
  after whitespace normalisation.
- `ground_truth`: accuracy against the locality answer, inputs as for edit_reliability; for `prob_comparison`
  predictions are log P(locality answer) and references log P(target_new) on the locality prompt (ROME's
  neighborhood score).

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
    predictions: per example, post-edit outputs (`unchanged`) or outputs on the locality prompts (`ground_truth`).
    references: per example, pre-edit outputs (`unchanged`) or the locality answers (`ground_truth`).
    protocol (`str`): `token_accuracy` (default), `prob_comparison` or `exact_match`.
    variant (`str`): `unchanged` or `ground_truth`.
    ignore_case (`bool`): `exact_match` only, casefold both sides.
Returns:
    score (`float`): the mean of the example scores.
    protocol (`str`): the protocol the score was computed with.
    num_examples (`int`): the number of examples.
    scores (`list[float]`): the example scores.
Examples:
    >>> metric = evaluate.load("evaluate_metrics/edit_locality")
    >>> metric.compute(
    ...     predictions=[[1, 2]],
    ...     references=[[1, 9]],
    ...     protocol="token_accuracy",
    ...     variant="unchanged"
    ... )["score"]
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
class EditLocality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=evaluate_features(),
            reference_urls=["https://github.com/zjunlp/EasyEdit", "https://github.com/kmeng01/rome"],
        )

    def _compute(self, predictions, references, protocol="token_accuracy", variant="unchanged", ignore_case=False):
        return edit_locality(predictions, references, protocol=protocol, variant=variant, ignore_case=ignore_case)
