"""The field's answer metrics against hand-computed cases and the original implementations.

Caption metrics: the reference values were computed with the coco-caption toolkit itself
(pycocoevalcap 1.2: ``Bleu(4)``, ``Rouge()``, ``Cider()`` — CIDEr-D — on the token strings
``caption_tokens`` gives, i.e. lower-cased with punctuation removed, as its PTB tokenizer
leaves them) on the fixture below, and are written here; the package (100 MB, Java for its
tokenizer) is not a dependency. VQA accuracy: the official ``vqaEval.py`` rules (the 2-of-10
annotators = 0.6 case is the one its authors document).
"""

from __future__ import annotations

import pytest

from mole.scoring import (
    anls,
    bleu4,
    box_iou,
    cider_d,
    grounding,
    known_metrics,
    multiple_choice,
    option_letter,
    rouge_l,
    score_answers,
    vqa_accuracy,
    vqa_normalize,
)

PREDS = ["a man riding a horse on a beach", "two dogs playing in the snow",
         "a plate of food with broccoli", "a red bus on the street"]
REFS = [["a man rides a horse along the beach", "a person on a horse at the seaside",
         "man riding horse on sandy beach"],
        ["two dogs play in the snow", "a couple of dogs running through snow"],
        ["a plate with broccoli and rice", "food on a white plate", "a dish of broccoli and chicken"],
        ["a red double decker bus on the street", "a bus"]]


def test_caption_metrics_reproduce_coco_caption():
    # pycocoevalcap 1.2 on this fixture: Bleu_4 0.2677680295733462, ROUGE_L 0.8082932692307692,
    # CIDEr 2.3434940425079223
    assert bleu4(PREDS, REFS) == pytest.approx(0.2677680295733462, abs=1e-12)
    assert sum(rouge_l(p, r) for p, r in zip(PREDS, REFS, strict=True)) / 4 == pytest.approx(
        0.8082932692307692, abs=1e-12)
    assert cider_d(PREDS, REFS) == pytest.approx(2.3434940425079223, abs=1e-12)
    got = score_answers(PREDS, REFS, ("bleu4", "rougeL", "cider"))
    assert got["cider"] == pytest.approx(234.34940425079223)  # reported ×100, as papers do


def test_caption_metrics_hand_cases():
    # identical caption, every n-gram in one image only: tf-idf vectors equal, cos 1 per n → 10
    assert cider_d(["a cat on a mat", "dogs run"], [["a cat on a mat"], ["two birds fly"]]
                   ) == pytest.approx(5.0)  # (10 + 0) / 2
    assert cider_d(["a cat"], [["a cat"]]) == 0.0  # one image: every idf is log 1 = 0
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # ROUGE-L with beta 1.2: LCS 3 of a 4-word prediction and a 6-word reference
    p, r = 3 / 4, 3 / 6
    assert rouge_l("a b c d", "a x b y c z") == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))


def test_vqa_accuracy_follows_the_official_rules():
    ten = ["yes", "yes"] + ["no"] * 8
    assert vqa_accuracy("yes", ten) == pytest.approx(0.6)  # 2 of 10 annotators
    assert vqa_accuracy("no", ten) == pytest.approx(1.0)
    assert vqa_accuracy("Yes.", ten) == pytest.approx(0.6)  # punctuation goes
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0  # number words → digits
    assert vqa_accuracy("the dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_normalize("dont know") == "don't know"  # contractions restored
    assert vqa_normalize("3.5 feet") == "3.5 feet"  # a decimal point stays
    assert vqa_accuracy("blue", "blue") == 1.0 and vqa_accuracy("red", "blue") == 0.0


def test_anls():
    assert anls("helo", "hello") == pytest.approx(0.8)  # 1 edit over 5 characters
    assert anls("HELLO ", "hello") == 1.0
    assert anls("abc", "xyz") == 0.0  # NL = 1 ≥ 0.5
    assert anls("ab", "abcd") == 0.0  # NL = 0.5 is not < 0.5
    assert anls("invoice 12", ["total", "invoice 12"]) == 1.0  # best reference


@pytest.mark.parametrize("text,letter", [
    ("B", "B"), ("(C)", "C"), ("D. a cat", "D"), ("The answer is A.", "A"),
    ("answer: (B)", "B"), ("I think it is C", "C"), ("none of these", None)])
def test_option_letters(text, letter):
    assert option_letter(text) == letter


def test_multiple_choice_and_grounding():
    assert multiple_choice("The answer is B.", "B") == 1.0
    assert multiple_choice("(A) red", "B") == 0.0
    assert grounding("[0.1, 0.2, 0.5, 0.6]", "[0.1,0.2,0.5,0.6]") == 1.0
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(1 / 3)
    assert grounding("(0, 0), (2, 2)", "[1, 0, 3, 2]") == 0.0  # IoU 1/3 < 0.5
    assert grounding("no box here", "[1, 0, 3, 2]") == 0.0


def test_every_metric_is_registered_and_unknown_ones_are_named():
    assert set(known_metrics()) >= {"exact", "f1", "vqa", "anls", "mc", "bleu4", "rougeL",
                                    "cider", "iou"}
    with pytest.raises(ValueError, match="unknown metrics \\['bleu'\\]"):
        score_answers(["a"], ["a"], ("bleu",))
