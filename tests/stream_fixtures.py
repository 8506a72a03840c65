"""Tiny on-disk copies of the CoIN and UCIT layouts, for the shipped stream files.

``build_coin_fixture(root)`` and ``build_ucit_fixture(root)`` write a handful of records per
task, in the benchmarks' own file names and record formats, with 16x16 images (JPEG where the
source distributes JPEG, PNG where it distributes PNG), and return ``root``: pass it as
``load_stream(..., root=root)`` (``data.stream-root``).

What is mirrored (sources in docs/streams.md):

* train files: LLaVA conversation records (``id`` or ``question_id``, ``image``,
  ``conversations`` human/gpt, ``<image>`` in the first human turn);
* test files: the LLaVA *evaluation question* format the benchmarks' scorers read —
  ``question_id``, ``image`` (absent for text-only ScienceQA questions), ``text`` (the prompt,
  without an ``<image>`` marker: the eval script adds it), and the reference: ``answer``
  (a string), or for CoIN Grounding ``answer_bbox`` (a "[x1, y1, x2, y2]" string) and ``size``;
  UCIT's caption test files carry no answer, their references are in the COCO-format
  ``val_coco_type_3000.json`` beside them (``images[].id`` = 1..N in test-file order,
  ``file_name`` = the image's basename);
* the side files the original scorers read: TextVQA_0.5.1_val.json (10 answers per question).

Record texts are invented; ids, paths and field names follow the real files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

COIN_INSTRUCTIONS = "playground/Instructions_Original"
COIN_IMAGES = "cl_dataset"
UCIT_INSTRUCTIONS = "instructions"
UCIT_IMAGES = "datasets"


def _image(path: Path, seed: int, size: int = 16) -> None:
    """A tiny image at ``path``, in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256)
    im = Image.new("RGB", (size, size), color)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, format="JPEG", quality=80)
    else:
        im.save(path, format="PNG")


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _train(rid: str, image: str | None, question: str, answer: str,
           key: str = "id") -> dict[str, Any]:
    prompt = f"<image>\n{question}" if image else question
    rec: dict[str, Any] = {key: rid}
    if image:
        rec["image"] = image
    rec["conversations"] = [{"from": "human", "value": prompt},
                            {"from": "gpt", "value": answer}]
    return rec


def _test(qid: Any, image: str | None, text: str, **ref: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"question_id": qid}
    if image:
        rec["image"] = image
    rec["text"] = text
    rec.update(ref)
    return rec


def _images(root: Path, records: list[dict[str, Any]], seed: int) -> None:
    for i, r in enumerate(records):
        if "image" in r:
            _image(root / r["image"], seed + i)


# -- CoIN ------------------------------------------------------------------------------------
SHORT = "Answer the question using a single word or phrase."
SQA_TAIL = "Answer with the option's letter from the given choices directly."


def _coin_tasks() -> dict[str, tuple[list[dict], list[dict], str]]:
    """task folder -> (train records, test records, test file name)."""
    sqa = ("ScienceQA", [
        _train("1", "ScienceQA/images/train/1/image.png",
               f"Which of these states is farthest north?\nA. Ohio\nB. Texas\n{SQA_TAIL}", "A"),
        _train("3", None, f"Which word is a noun?\nA. run\nB. table\n{SQA_TAIL}", "B"),
        _train("5", "ScienceQA/images/train/5/image.png",
               f"What is the shape shown?\nA. circle\nB. square\nC. cone\n{SQA_TAIL}", "C"),
    ], [
        _test("4", None, f"Which is a solid?\nA. milk\nB. rock\n{SQA_TAIL}", answer="B"),
        _test("6", "ScienceQA/images/test/6/image.png",
              f"Which animal is shown?\nA. cat\nB. dog\n{SQA_TAIL}", answer="A"),
    ], "test.json")
    textvqa = ("TextVQA", [
        _train("0054c91397f2fe05", "TextVQA/train_images/0054c91397f2fe05.jpg",
               f"What is written on the sign?\n{SHORT}", "stop"),
        _train("00685bc495504d61", "TextVQA/train_images/00685bc495504d61.jpg",
               f"What brand is the phone?\n{SHORT}", "nokia"),
        _train("006d10667d17b924", "TextVQA/train_images/006d10667d17b924.jpg",
               f"What number is on the bus?\n{SHORT}", "12"),
    ], [
        _test(34602, "TextVQA/train_images/003a8ae2ef43b901.jpg",
              f"What does the banner say?\n{SHORT}", answer="sale"),
        _test(34603, "TextVQA/train_images/0045a5c8d4d4b0b5.jpg",
              f"What year is shown?\n{SHORT}", answer="1999"),
    ], "val.json")
    imagenet = ("ImageNet", [
        _train("0", "ImageNet_withlabel/train/n01514668/n01514668_10004.JPEG",
               "What is the object in the image?\nAnswer the question using a single word or "
               "phrase.", "cock"),
        _train("1", "ImageNet_withlabel/train/n01440764/n01440764_10026.JPEG",
               f"What is the object in the image?\n{SHORT}", "tench"),
        _train("2", "ImageNet_withlabel/train/n01443537/n01443537_10007.JPEG",
               f"What is the object in the image?\n{SHORT}", "goldfish"),
    ], [
        _test(0, "ImageNet_withlabel/val/ILSVRC2012_val_00000293.JPEG",
              f"What is the object in the image?\n{SHORT}", answer="tench"),
        _test(1, "ImageNet_withlabel/val/ILSVRC2012_val_00002138.JPEG",
              f"What is the object in the image?\n{SHORT}", answer="goldfish"),
    ], "test.json")
    gqa = ("GQA", [
        _train("02930152", "GQA/images/2354786.jpg", f"Is the sky dark?\n{SHORT}", "yes"),
        _train("02930160", "GQA/images/2375429.jpg", f"What is on the table?\n{SHORT}", "cup"),
        _train("03081466", "GQA/images/2368341.jpg", f"Who is wearing a hat?\n{SHORT}", "man"),
    ], [
        _test("20968415", "GQA/images/n161313.jpg", f"Is it indoors?\n{SHORT}", answer="no"),
        _test("20968416", "GQA/images/n235859.jpg", f"What color is the car?\n{SHORT}",
              answer="red"),
    ], "test.json")
    vizwiz = ("VizWiz", [
        _train("VizWiz_train_00000000", "VizWiz/train/VizWiz_train_00000000.jpg",
               "What is this?\nWhen the provided information is insufficient, respond with "
               "'Unanswerable'.\n" + SHORT, "basil leaves"),
        _train("VizWiz_train_00000001", "VizWiz/train/VizWiz_train_00000001.jpg",
               f"What color is this shirt?\n{SHORT}", "blue"),
        _train("VizWiz_train_00000002", "VizWiz/train/VizWiz_train_00000002.jpg",
               f"What does this say?\n{SHORT}", "unanswerable"),
    ], [
        _test("VizWiz_val_00000000", "VizWiz/val/VizWiz_val_00000000.jpg",
              f"What is this can?\n{SHORT}", answer="soup"),
        _test("VizWiz_val_00000001", "VizWiz/val/VizWiz_val_00000001.jpg",
              f"Which button is this?\n{SHORT}", answer="play"),
    ], "test.json")
    box = ("Please provide the bounding box coordinate of the region this sentence describes: ")
    grounding = ("Grounding", [
        _train("0", "COCO2014/train2014/COCO_train2014_000000000009.jpg",
               box + "bowl of broccoli.", "[0.11, 0.43, 0.55, 0.86]"),
        _train("1", "COCO2014/train2014/COCO_train2014_000000000025.jpg",
               box + "giraffe on the left.", "[0.02, 0.1, 0.47, 0.95]"),
        _train("2", "COCO2014/train2014/COCO_train2014_000000000030.jpg",
               box + "white vase.", "[0.31, 0.2, 0.64, 0.8]"),
    ], [
        _test(0, "COCO2014/train2014/COCO_train2014_000000000049.jpg", box + "man on the horse.",
              answer_bbox="[0.25, 0.18, 0.61, 0.9]", size=[500, 381]),
        _test(1, "COCO2014/train2014/COCO_train2014_000000000061.jpg", box + "left elephant.",
              answer_bbox="[0.0, 0.3, 0.42, 0.77]", size=[640, 480]),
    ], "test.json")
    vqav2 = ("VQAv2", [
        _train("458752000", "COCO2014/train2014/COCO_train2014_000000458752.jpg",
               f"What is this photo taken looking through?\n{SHORT}", "net"),
        _train("458752001", "COCO2014/train2014/COCO_train2014_000000458752.jpg",
               f"What position is this man playing?\n{SHORT}", "pitcher"),
        _train("262146000", "COCO2014/train2014/COCO_train2014_000000262146.jpg",
               f"What is the person doing?\n{SHORT}", "skiing"),
    ], [
        _test(262148000, "COCO2014/val2014/COCO_val2014_000000262148.jpg",
              f"Where is he looking?\n{SHORT}", answer="down"),
        _test(393225000, "COCO2014/val2014/COCO_val2014_000000393225.jpg",
              f"How many bowls are there?\n{SHORT}", answer="2"),
    ], "test.json")
    ocrvqa = ("OCRVQA", [
        _train("1001", "OCR-VQA/images/000195850X.jpg", f"Who wrote this book?\n{SHORT}",
               "Jane Doe"),
        _train("1002", "OCR-VQA/images/000195850X.jpg", f"Is this a comic book?\n{SHORT}", "No"),
        _train("1003", "OCR-VQA/images/0001990434.jpg", f"What is the title of this book?\n{SHORT}",
               "Garden Birds"),
    ], [
        _test("2001", "OCR-VQA/images/0002005395.jpg", f"What is the genre of this book?\n{SHORT}",
              answer="Travel"),
        _test("2002", "OCR-VQA/images/0002006758.jpg", f"Is this book related to travel?\n{SHORT}",
              answer="Yes"),
    ], "test.json")
    return {t[0]: t[1:] for t in (sqa, textvqa, imagenet, gqa, vizwiz, grounding, vqav2, ocrvqa)}


def build_coin_fixture(root: Path) -> Path:
    """CoIN's layout, 3 train and 2 test records per task, under ``root``; returns ``root``."""
    root = Path(root)
    images = root / COIN_IMAGES
    for n, (task, (train, test, test_name)) in enumerate(_coin_tasks().items()):
        _write(root / COIN_INSTRUCTIONS / task / "train.json", train)
        _write(root / COIN_INSTRUCTIONS / task / test_name, test)
        _images(images, train, 10 * n)
        _images(images, test, 10 * n + 5)
        if task == "TextVQA":  # the scorer's 10 reference answers (TextVQA 0.5.1 format)
            _write(images / "TextVQA" / "TextVQA_0.5.1_val.json", {
                "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                "data": [{"question_id": r["question_id"], "question": r["text"].split("\n")[0],
                          "image_id": Path(r["image"]).stem, "image_classes": [],
                          "answers": [r["answer"]] * 9 + ["unanswerable"]} for r in test]})
    return root


# -- UCIT ------------------------------------------------------------------------------------
CAPTION = "What is happening in the image? Generate a brief caption for the image."
LETTER = "Answer with the option's letter from the given choices directly."


def _ucit_tasks() -> dict[str, tuple[str, list[dict], list[dict], list[list[str]] | None]]:
    """task folder -> (train file name, train records, test records, caption refs or None)."""
    q = "question_id"
    imr = ("train.json", [
        _train("imr-0", "ImageNet-R/train/n01443537/art_11.jpg",
               f"What is the object in the image?\n{SHORT}", "goldfish", q),
        _train("imr-1", "ImageNet-R/train/n01484850/cartoon_3.jpg",
               f"What is the object in the image?\n{SHORT}", "great white shark", q),
        _train("imr-2", "ImageNet-R/train/n01494475/sketch_7.jpg",
               f"What is the object in the image?\n{SHORT}", "hammerhead", q),
    ], [
        _test("imr-t0", "ImageNet-R/test/n01443537/painting_2.jpg",
              f"What is the object in the image?\n{SHORT}", answer="goldfish"),
        _test("imr-t1", "ImageNet-R/test/n01494475/toy_0.jpg",
              f"What is the object in the image?\n{SHORT}", answer="hammerhead"),
    ], None)
    arxiv = ("train_4w.json", [
        _train("arx-0", "ArxivQA/images/1911.02852_1.jpg",
               f"What trend does the plot show?\nA. rising\nB. falling\n{LETTER}", "A", q),
        _train("arx-1", "ArxivQA/images/1508.00293_0.jpg",
               f"Which curve is highest at x=0?\nA. red\nB. blue\nC. green\n{LETTER}", "C", q),
        _train("arx-2", "ArxivQA/images/0704.0289_0.jpg",
               f"How many peaks are visible?\nA. one\nB. two\n{LETTER}", "B", q),
    ], [
        _test("arx-t0", "ArxivQA/images/2101.00001_0.jpg",
              f"What does the x-axis show?\nA. time\nB. mass\n{LETTER}", answer="A"),
        _test("arx-t1", "ArxivQA/images/2101.00002_2.jpg",
              f"Which method is best?\nA. ours\nB. baseline\n{LETTER}", answer="A"),
    ], None)
    vizwiz = ("train.json", [
        _train("VizWiz_train_00015790", "VizWiz/train/VizWiz_train_00015790.jpg", CAPTION,
               "A can of tomato soup on a kitchen counter.", q),
        _train("VizWiz_train_00007930", "VizWiz/train/VizWiz_train_00007930.jpg", CAPTION,
               "A pink box of medicine held in a hand.", q),
        _train("VizWiz_train_00000001", "VizWiz/train/VizWiz_train_00000001.jpg", CAPTION,
               "A blurry photo of a computer keyboard.", q),
    ], [
        _test("VizWiz_val_00000001", "VizWiz/val/VizWiz_val_00000001.jpg", CAPTION),
        _test("VizWiz_val_00000002", "VizWiz/val/VizWiz_val_00000002.jpg", CAPTION),
    ], [["A bottle of water on a desk.", "A plastic water bottle."],
        ["A remote control on a sofa.", "A black TV remote."]])
    iconqa = ("train.json", [
        _train("93589", "IconQA/iconqa_data/iconqa/train/fill_in_blank/93589/image.png",
               f"How many triangles are there?\n{SHORT}", "4", q),
        _train("21114", "IconQA/iconqa_data/iconqa/train/fill_in_blank/21114/image.png",
               f"How many shapes are orange?\n{SHORT}", "2", q),
        _train("10", "IconQA/iconqa_data/iconqa/train/choose_txt/10/image.png",
               f"Which shape is shown?\nA. circle\nB. star\n{LETTER}", "B", q),
    ], [
        _test("7", "IconQA/iconqa_data/iconqa/test/choose_txt/7/image.png",
              f"What time is shown?\nA. 3:00\nB. 9:00\n{LETTER}", answer="A"),
        _test("103", "IconQA/iconqa_data/iconqa/test/fill_in_blank/103/image.png",
              f"How many dots are there?\n{SHORT}", answer="6"),
    ], None)
    clevr = ("train_4w.json", [
        _train("clevr-0", "CLEVR/images/train/CLEVR_train_021226.png",
               f"Subtract 0 cyan cylinders. How many objects are left?\n{SHORT}", "3", q),
        _train("clevr-1", "CLEVR/images/train/CLEVR_train_063601.png",
               f"Subtract all spheres. How many objects are left?\n{SHORT}", "4", q),
        _train("clevr-2", "CLEVR/images/train/CLEVR_train_000001.png",
               f"Add 1 red cube. How many cubes are there?\n{SHORT}", "2", q),
    ], [
        _test("clevr-t0", "CLEVR/images/val/CLEVR_val_000000.png",
              f"Subtract all cubes. How many objects are left?\n{SHORT}", answer="5"),
        _test("clevr-t1", "CLEVR/images/val/CLEVR_val_000010.png",
              f"Subtract 2 balls. How many objects are left?\n{SHORT}", answer="1"),
    ], None)
    flickr = ("train_brief_4w.json", [
        _train("2250713748", "Flickr30k/train/2250713748.jpg", CAPTION,
               "Two dogs run across a grassy field.", q),
        _train("1278818225", "Flickr30k/train/1278818225.jpg", CAPTION,
               "A man rides a bicycle down a city street.", q),
        _train("1000366164", "Flickr30k/train/1000366164.jpg", CAPTION,
               "Children play in a fountain on a sunny day.", q),
    ], [
        _test("1007129816", "Flickr30k/val/1007129816.jpg", CAPTION),
        _test("1009434119", "Flickr30k/val/1009434119.jpg", CAPTION),
    ], [["A man in an orange hat stares at something.", "A man wears an orange hat."],
        ["A black and white dog runs in a yard.", "A dog is running on the grass."]])
    return {"ImageNet-R": imr, "ArxivQA": arxiv, "VizWiz": vizwiz, "IconQA": iconqa,
            "CLEVR": clevr, "Flickr30k": flickr}


def _coco_captions(test: list[dict[str, Any]], refs: list[list[str]]) -> dict[str, Any]:
    """val_coco_type_3000.json: COCO caption annotations, image ids 1..N in test-file order."""
    images, annotations = [], []
    for i, (r, caps) in enumerate(zip(test, refs, strict=True), 1):
        images.append({"id": i, "file_name": Path(r["image"]).name})
        annotations += [{"image_id": i, "id": len(annotations) + 1, "caption": c} for c in caps]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def build_ucit_fixture(root: Path) -> Path:
    """UCIT's layout, 3 train and 2 test records per task, under ``root``; returns ``root``."""
    root = Path(root)
    images = root / UCIT_IMAGES
    for n, (task, (train_name, train, test, refs)) in enumerate(_ucit_tasks().items()):
        folder = root / UCIT_INSTRUCTIONS / task
        _write(folder / train_name, train)
        _write(folder / "test_3000.json", test)
        if refs is not None:
            _write(folder / "val_coco_type_3000.json", _coco_captions(test, refs))
        _images(images, train, 10 * n)
        _images(images, test, 10 * n + 5)
    return root
