"""Scoring generated answers with the field's metrics (used by every evaluator, edge included).

A registry of metrics by name; a task names the ones it reports (the first is its primary).
Every score is a mean over samples in percent (CIDEr-D too: 109.0 where coco-caption prints
1.090). A sample's reference is one answer or a list of them (VQA's ten annotators, COCO's five
captions).

* ``exact``  — case/whitespace-insensitive equality with any reference.
* ``f1``     — SQuAD-style bag-of-words F1, best over the references.
* ``vqa``    — VQA accuracy (Antol et al. 2015; the official ``vqaEval.py``): answers normalised
  (punctuation, number words → digits, articles dropped, contractions restored); with k
  references, the mean over the k leave-one-out subsets of min(#matches / 3, 1). Unlike the
  official script, the references are normalised too and so is the prediction when all
  references agree (VQA v2's answers come normalised; users' own data may not).
* ``anls``   — Average Normalised Levenshtein Similarity (Biten et al. 2019, ST-VQA / DocVQA):
  max over references of 1 − NL when NL < 0.5, else 0, on lower-cased stripped strings.
* ``mc``     — multiple-choice accuracy: the option letter parsed from the answer ("B",
  "(B)", "B. text", "The answer is B.") equals the reference's letter.
* ``bleu4``, ``rougeL``, ``cider`` — BLEU-4 (corpus level, closest reference length, the
  coco-caption smoothing constants), ROUGE-L (LCS F-measure with β = 1.2, best precision and
  recall over the references) and CIDEr-D (n ≤ 4, σ = 6, clipped tf-idf with document
  frequencies over the evaluated set, ×10) as the coco-caption toolkit computes them, on
  lower-cased tokens with punctuation removed.
* ``iou``    — grounding accuracy: the first box ``[x1, y1, x2, y2]`` in the answer has IoU ≥ 0.5
  with the reference box (same coordinate convention on both sides).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Refs = str | Sequence[str]


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _refs(ref: Refs) -> list[str]:
    return [ref] if isinstance(ref, str) else list(ref)


def exact_match(pred: str, ref: Refs) -> bool:
    """Case- and whitespace-insensitive equality (with any reference)."""
    return any(normalize(pred) == normalize(r) for r in _refs(ref))


def token_f1(pred: str, ref: Refs) -> float:
    """SQuAD-style bag-of-words F1 in [0, 1] (best over references); two empty strings score 1."""
    return max(_f1(pred, r) for r in _refs(ref))


def _f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


# -- VQA accuracy ---------------------------------------------------------------------------
# The official evaluation's tables (vqaEval.py): contractions written without the apostrophe
# get it back, number words become digits, articles go.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period that is not a decimal point
_COMMA = re.compile(r"(\d)(,)(\d)")  # a thousands separator


def _vqa_punct(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _vqa_words(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_normalize(answer: str) -> str:
    """The official VQA answer normalisation (punctuation, digits, articles, contractions)."""
    return _vqa_words(_vqa_punct(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(pred: str, ref: Refs) -> float:
    """min(#matching annotators / 3, 1), averaged over the leave-one-out subsets (official)."""
    refs = [vqa_normalize(r) for r in _refs(ref)]
    p = vqa_normalize(pred)
    if len(refs) == 1:
        return float(p == refs[0])
    accs = [min(1.0, sum(r == p for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(accs) / len(accs)


# -- ANLS -----------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, ref: Refs, threshold: float = 0.5) -> float:
    """Best over references of 1 − NL(pred, ref) if NL < threshold else 0 (NL: edit distance
    over the longer string's length, on lower-cased, whitespace-stripped strings)."""
    p = " ".join(pred.lower().split())
    best = 0.0
    for r in _refs(ref):
        r = " ".join(r.lower().split())
        longest = max(len(p), len(r))
        nl = levenshtein(p, r) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# -- multiple choice ------------------------------------------------------------------------
_LEAD = re.compile(r"^\(?([A-Z])(?:[\).:,]|$)")
_SAID = re.compile(r"(?:answer|option)\s*(?:is|:)?\s*:?\s*\(?([A-Z])\b", re.IGNORECASE)
_ANY = re.compile(r"\b([A-F])\b")  # a bare letter later in the text: only A-F ("I think…")


def option_letter(text: str) -> str | None:
    """The option letter an answer gives: "B", "(B)", "B. a cat", "The answer is B.", …"""
    t = text.strip()
    for pattern in (_LEAD, _SAID, _ANY):
        m = pattern.search(t)
        if m:
            return m.group(1).upper()
    return None


def multiple_choice(pred: str, ref: Refs) -> float:
    letters = {option_letter(r) for r in _refs(ref)} - {None}
    got = option_letter(pred)
    return float(got is not None and got in letters)


# -- captions: BLEU-4, ROUGE-L, CIDEr-D as coco-caption computes them ------------------------
_NON_WORD = re.compile(r"[^\w\s]")


def caption_tokens(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (what coco-caption's PTB tokenizer leaves)."""
    return _NON_WORD.sub(" ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu4(preds: Sequence[str], refs: Sequence[Refs]) -> float:
    """Corpus BLEU-4 in [0, 1]: clipped n-gram precisions summed over the corpus, the closest
    reference length for the brevity penalty, coco-caption's tiny/small smoothing constants."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * 4, [0] * 4
    test_len = ref_len = 0
    for pred, ref in zip(preds, refs, strict=True):
        words = caption_tokens(pred)
        ref_words = [caption_tokens(r) for r in _refs(ref)]
        max_ref: Counter[tuple[str, ...]] = Counter()
        for rw in ref_words:
            for g, c in _ngrams(rw, 4).items():
                max_ref[g] = max(max_ref[g], c)
        for g, c in _ngrams(words, 4).items():
            correct[len(g) - 1] += min(c, max_ref[g])
        for k in range(4):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]
    score = 1.0
    for k in range(4):
        score *= (correct[k] + tiny) / (guess[k] + small)
    bleu = score ** 0.25
    ratio = (test_len + tiny) / (ref_len + small)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: Refs, beta: float = 1.2) -> float:
    words = caption_tokens(pred)
    if not words:
        return 0.0
    prec, rec = [], []
    for text in _refs(ref):
        rw = caption_tokens(text)
        lcs = _lcs(rw, words)
        prec.append(lcs / len(words))
        rec.append(lcs / len(rw) if rw else 0.0)
    p, r = max(prec), max(rec)
    if p == 0 or r == 0:
        return 0.0
    return (1 + beta ** 2) * p * r / (r + beta ** 2 * p)


def cider_d(preds: Sequence[str], refs: Sequence[Refs], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D over the evaluated set (document frequencies come from its references), ×10 as
    in coco-caption; a set of one sample scores 0 (every n-gram's idf is log 1)."""
    pred_counts = [_ngrams(caption_tokens(p), n) for p in preds]
    ref_counts = [[_ngrams(caption_tokens(r), n) for r in _refs(ref)] for ref in refs]
    df: Counter[tuple[str, ...]] = Counter()
    for image_refs in ref_counts:
        df.update({g for c in image_refs for g in c})
    log_n = math.log(float(len(ref_counts)))

    def vec(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for g, tf in counts.items():
            w = tf * (log_n - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 2)  # coco-caption counts bigrams
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for pc, rcs in zip(pred_counts, ref_counts, strict=True):
        vh, nh, lh = vec(pc)
        total = [0.0] * n
        for rc in rcs:
            vr, nr, lr = vec(rc)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        scores.append(10.0 * (sum(total) / n) / len(rcs))
    return sum(scores) / len(scores)


# -- grounding ------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of the answer as a box (x1, y1, x2, y2), corners put in order."""
    nums = [float(x) for x in _NUMBER.findall(text)[:4]]
    if len(nums) < 4:
        return None
    x1, y1, x2, y2 = nums
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding(pred: str, ref: Refs, threshold: float = 0.5) -> float:
    box = parse_box(pred)
    if box is None:
        return 0.0
    return float(any((rb := parse_box(r)) is not None and box_iou(box, rb) >= threshold
                     for r in _refs(ref)))


# -- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    """A per-sample score in [0, 1] (averaged), or a corpus-level one (``corpus``)."""

    name: str
    sample: Callable[[str, Refs], float] | None = None
    corpus: Callable[[Sequence[str], Sequence[Refs]], float] | None = None

    def __call__(self, preds: Sequence[str], refs: Sequence[Refs]) -> float:
        if self.corpus is not None:
            return self.corpus(preds, refs)
        assert self.sample is not None
        return sum(self.sample(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)


_METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> Metric:
    if (metric.sample is None) == (metric.corpus is None):
        raise ValueError(f"metric {metric.name!r} needs exactly one of sample / corpus")
    _METRICS[metric.name] = metric
    return metric


def known_metrics() -> list[str]:
    return sorted(_METRICS)


for _m in (Metric("exact", sample=lambda p, r: float(exact_match(p, r))),
           Metric("f1", sample=token_f1), Metric("vqa", sample=vqa_accuracy),
           Metric("anls", sample=anls), Metric("mc", sample=multiple_choice),
           Metric("bleu4", corpus=bleu4), Metric("rougeL", sample=rouge_l),
           Metric("cider", corpus=cider_d), Metric("iou", sample=grounding)):
    register_metric(_m)


def score_answers(preds: Sequence[str], refs: Sequence[Refs], metrics: Sequence[str] = ("exact",)
                  ) -> dict[str, float]:
    """Each metric over the samples, in percent (a reference: one answer or a list)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        raise ValueError("no samples to score")
    unknown = [m for m in metrics if m not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {known_metrics()}")
    return {m: 100.0 * _METRICS[m](preds, refs) for m in metrics}
