"""Importers: each format on a small folder built in its distribution layout, with a corrupt image, a missing mask
and a 0/255 mask (and a 0/1 one); the report lists exactly the bad files; re-import gives identical shards."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.cli import build_parser
from cluster.commands.common import CommandError
from cluster.data.importers import ImportError_, ImportOptions, import_dataset
from cluster.data.importers.coco_masks import decode_rle, render_polygons, rle_counts_from_string
from cluster.data.importers.reasonseg import render_shapes
from protos.dataset import DATASET_SCHEMA, Sample
from runtime.images import decode_mask

H, W = 24, 32
FG = "Identify and segment all the primary objects in the image."


def write_image(path: Path, seed: int, h: int = H, w: int = W) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(path.suffix, rgb)
    assert ok
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def box_mask(seed: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    y, x = 2 + seed % 5, 3 + seed % 7
    m[y : y + 8, x : x + 10] = True
    return m


def write_mask(path: Path, mask: np.ndarray, top: int = 255) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask.astype(np.uint8) * top)


def read_rows(out: Path) -> list[Sample]:
    rows = []
    for shard in sorted(out.glob("*.parquet")):
        table = pq.read_table(shard)
        assert table.schema.equals(DATASET_SCHEMA)
        rows += [Sample.from_row(r) for r in table.to_pylist()]
    return rows


def report_of(out: Path) -> dict:
    return json.loads((out / "import_report.json").read_text())


def skipped(out: Path) -> set[tuple[str, str]]:
    """(file name, first word of the reason) of every skipped entry."""
    return {(Path(s["path"]).name, s["reason"].split(":")[0]) for s in report_of(out)["skipped"]}


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


# ------------------------------------------------------------------------------------------------------------
# Image + mask folder formats


def build_pairs(img_dir: Path, mask_dir: Path, stems: list[str], img_ext: str = ".jpg") -> dict:
    """Four images: stems[0] 0/255 mask, stems[1] 0/1 mask, stems[2] corrupt image, stems[3] no mask.
    Returns the expected masks of the good ones and their image bytes."""
    good = {}
    for k, stem in enumerate(stems):
        if k == 2:
            img_dir.mkdir(parents=True, exist_ok=True)
            (img_dir / f"{stem}{img_ext}").write_bytes(b"\xff\xd8\xff not really a jpeg")
        else:
            data = write_image(img_dir / f"{stem}{img_ext}", seed=k)
        if k != 3:
            write_mask(mask_dir / f"{stem}.png", box_mask(k), top=1 if k == 1 else 255)
        if k in (0, 1):
            good[stem] = (box_mask(k), data)
    return good


LAYOUTS = {
    # format: (split, images dir, masks dir, stems, image extension)
    "camo": (
        "train",
        "Images/Train",
        "GT",
        ["camourflage_00001", "camourflage_00002", "camourflage_00003", "camourflage_00004"],
        ".jpg",
    ),
    "nc4k": ("test", "NC4K/Imgs", "NC4K/GT", ["1", "2", "3", "4"], ".jpg"),
    "duts": (
        "train",
        "DUTS-TR/DUTS-TR-Image",
        "DUTS-TR/DUTS-TR-Mask",
        [f"ILSVRC2012_test_0000000{k}" for k in range(1, 5)],
        ".jpg",
    ),
    "dut-omron": (
        "test",
        "DUT-OMRON-image",
        "pixelwiseGT-new-PNG",
        ["im005", "im007", "im010", "im011"],
        ".jpg",
    ),
    "hku-is": ("test", "HKU-IS/imgs", "HKU-IS/gt", ["0004", "0005", "0006", "0007"], ".png"),
    "ecssd": ("test", "images", "ground_truth_mask", ["0001", "0002", "0003", "0004"], ".jpg"),
    "dis5k": (
        "train",
        "DIS5K/DIS-TR/im",
        "DIS5K/DIS-TR/gt",
        ["1#Accessories#1#Bag#1", "1#Accessories#1#Bag#2", "2#Aircraft#1#A#3", "2#Aircraft#1#A#4"],
        ".jpg",
    ),
}


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_folder_layouts(tmp_path: Path, fmt: str) -> None:
    split, img_rel, mask_rel, stems, ext = LAYOUTS[fmt]
    src = tmp_path / "src"
    good = build_pairs(src / img_rel, src / mask_rel, stems, ext)
    out = tmp_path / "out"
    assert (
        cli(["data", "import", "--format", fmt, "--src", str(src), "--out", str(out), "--no-progress"]) == 0
    )
    rows = read_rows(out)
    assert [r.id for r in rows] == sorted(f"{fmt}/{split}/{s}" for s in good)
    for row in rows:
        mask, data = good[row.id.rsplit("/", 1)[1]]
        assert row.image == data  # original bytes, original resolution
        assert (row.width, row.height) == (W, H) and row.task == "foreground" and row.instruction == FG
        assert row.source == fmt and row.split == split
        assert np.array_equal(decode_mask(row.mask), mask)  # 0/1 and 0/255 inputs alike
        assert set(np.unique(cv2.imdecode(np.frombuffer(row.mask, np.uint8), cv2.IMREAD_UNCHANGED))) <= {0, 1}
    assert skipped(out) == {(f"{stems[2]}{ext}", "corrupt image"), (f"{stems[3]}{ext}", "missing mask")}
    assert report_of(out)["imported"] == 2


def cod10k_tree(src: Path) -> dict:
    stems = [f"COD10K-CAM-1-Aquatic-1-BatFish-{k}" for k in range(1, 5)]
    good = build_pairs(src / "Train/Image", src / "Train/GT_Object", stems)
    write_image(src / "Train/Image/COD10K-NonCAM-5-Background-1-Forest-5.jpg", seed=9)
    write_image(src / "Train/Image/COD10K-CAM-2-Terrestrial-23-Cat-6.jpg", seed=6)
    write_mask(
        src / "Train/GT_Object/COD10K-CAM-2-Terrestrial-23-Cat-6.png", box_mask(6, h=H + 2)
    )  # wrong size
    write_mask(src / "Train/GT_Object/COD10K-CAM-3-Flying-50-Bat-7.png", box_mask(7))  # no image
    return good


def test_cod10k_report_lists_exactly_the_bad_files(tmp_path: Path) -> None:
    src, out = tmp_path / "COD10K-v3", tmp_path / "out"
    good = cod10k_tree(src)
    report = import_dataset(ImportOptions("cod10k", out, src=src, progress=False))
    assert report.imported == 2 and report.dropped == {"noncam": 1}
    assert sorted(r.id.rsplit("/", 1)[1] for r in read_rows(out)) == sorted(good)
    assert skipped(out) == {
        ("COD10K-CAM-1-Aquatic-1-BatFish-3.jpg", "corrupt image"),
        ("COD10K-CAM-1-Aquatic-1-BatFish-4.jpg", "missing mask"),
        ("COD10K-CAM-2-Terrestrial-23-Cat-6.png", "size mismatch"),
        ("COD10K-CAM-3-Flying-50-Bat-7.png", "missing image"),
    }
    # --include-noncam keeps the NonCAM image, with an empty mask (it holds no camouflaged object)
    out2 = tmp_path / "out2"
    import_dataset(ImportOptions("cod10k", out2, src=src, include_noncam=True, progress=False))
    noncam = [r for r in read_rows(out2) if "NonCAM" in r.id]
    assert len(noncam) == 1 and not decode_mask(noncam[0].mask).any()


def test_reimport_is_byte_identical_and_replaces_old_shards(tmp_path: Path) -> None:
    src = tmp_path / "COD10K-v3"
    cod10k_tree(src)
    a, b = tmp_path / "a", tmp_path / "b"
    import_dataset(ImportOptions("cod10k", a, src=src, shard_rows=1, workers=1, progress=False))
    import_dataset(ImportOptions("cod10k", b, src=src, shard_rows=1, workers=3, progress=False))
    assert shard_bytes(a) == shard_bytes(b) and len(shard_bytes(a)) == 2
    # re-running into the same folder with bigger shards leaves exactly the new shards
    import_dataset(ImportOptions("cod10k", a, src=src, shard_rows=10, progress=False))
    assert list(shard_bytes(a)) == ["cod10k-train-00000-of-00001.parquet"]
    assert not list(a.glob(".importing-*"))


def test_strict_is_fatal_with_the_path_and_writes_nothing(tmp_path: Path) -> None:
    src, out = tmp_path / "COD10K-v3", tmp_path / "out"
    cod10k_tree(src)
    with pytest.raises(
        CommandError, match=r"COD10K-CAM-.*(\.jpg|\.png): (corrupt image|missing|size mismatch)"
    ):
        cli(
            [
                "data",
                "import",
                "--format",
                "cod10k",
                "--src",
                str(src),
                "--out",
                str(out),
                "--strict",
                "--no-progress",
            ]
        )
    assert not list(out.glob("*.parquet")) and not (out / "import_report.json").exists()


def test_generic_folder_and_layout_errors(tmp_path: Path) -> None:
    good = build_pairs(tmp_path / "pics", tmp_path / "labels", ["a", "b", "c", "d"], ".png")
    out = tmp_path / "out"
    cli(["data", "import", "--format", "folder", "--images", str(tmp_path / "pics"), "--masks", str(tmp_path / "labels"),
         "--out", str(out), "--split", "val", "--source", "mine", "--no-progress"])  # fmt: skip
    assert [r.id for r in read_rows(out)] == ["mine/val/a", "mine/val/b"] and len(good) == 2
    with pytest.raises(
        ImportError_, match=r"tried \(images\|masks\): DUTS-TR/DUTS-TR-Image\|DUTS-TR/DUTS-TR-Mask"
    ):
        import_dataset(ImportOptions("duts", tmp_path / "o", src=tmp_path, progress=False))
    with pytest.raises(ImportError_, match=r"no split 'tset'; choose --split from \['test', 'train'\]"):
        import_dataset(ImportOptions("duts", tmp_path / "o", src=tmp_path, split="tset", progress=False))


def test_dis5k_test_split_reads_te1_to_te4(tmp_path: Path) -> None:
    for k in range(1, 5):
        write_image(tmp_path / f"DIS-TE{k}/im/obj{k}.jpg", seed=k)
        write_mask(tmp_path / f"DIS-TE{k}/gt/obj{k}.png", box_mask(k))
    report = import_dataset(
        ImportOptions("dis5k", tmp_path / "out", src=tmp_path, split="test", progress=False)
    )
    assert report.imported == 4 and report.skipped == []


# ------------------------------------------------------------------------------------------------------------
# COCO masks and RefCOCO


def rle_encode(mask: np.ndarray) -> list[int]:
    flat = mask.T.reshape(-1).astype(np.uint8)  # column-major
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            prev, run = v, 0
        run += 1
    counts.append(run)
    return counts


def rle_to_string(counts: list[int]) -> str:
    """pycocotools' rleToString, written out here to test the decoder against the published algorithm."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def test_rle_uncompressed_and_compressed_decode() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((13, 17)) > 0.6
    counts = rle_encode(mask)
    assert np.array_equal(decode_rle({"size": [13, 17], "counts": counts}), mask)
    assert rle_counts_from_string(rle_to_string(counts)) == counts
    assert np.array_equal(decode_rle({"size": [13, 17], "counts": rle_to_string(counts)}), mask)


def test_polygon_rendering_covers_the_pixel_centres_inside() -> None:
    m = render_polygons([[2, 3, 12, 3, 12, 9, 2, 9]], 12, 16)  # the square [2,12) x [3,9) in COCO coordinates
    expected = np.zeros((12, 16), bool)
    expected[3:9, 2:12] = True
    assert np.array_equal(m, expected)


def refcocog_tree(root: Path) -> dict:
    """refcocog/{instances.json, refs(umd).p} and images/mscoco/images/train2014/ with: image 1 (polygon ref, 2
    sentences; RLE ref), image 2 missing on disk, image 3 corrupt, image 4 annotated at another size."""
    coco = root / "images/mscoco/images/train2014"
    write_image(coco / "COCO_train2014_000000000001.jpg", seed=1)
    (coco / "COCO_train2014_000000000003.jpg").write_bytes(b"broken")
    write_image(coco / "COCO_train2014_000000000004.jpg", seed=4)
    rle_mask = box_mask(5)
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": H, "width": W + (i == 4)}
        for i in (1, 2, 3, 4)
    ]
    anns = [
        {"id": 10, "image_id": 1, "segmentation": [[2, 3, 12, 3, 12, 9, 2, 9]], "category_id": 1},
        {
            "id": 11,
            "image_id": 1,
            "segmentation": {"size": [H, W], "counts": rle_to_string(rle_encode(rle_mask))},
        },
        {"id": 12, "image_id": 2, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 13, "image_id": 3, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        {"id": 14, "image_id": 4, "segmentation": [[1, 1, 5, 1, 5, 5]]},
    ]

    def ref(ref_id, ann_id, image_id, split, sents):
        sentences = [
            {"sent_id": 100 * ref_id + k, "sent": s, "raw": s, "tokens": s.split()}
            for k, s in enumerate(sents)
        ]
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences], "category_id": 1, "file_name": "ignored.jpg"}  # fmt: skip

    refs = [
        ref(1, 10, 1, "val", ["the man on the left", "a man"]),
        ref(2, 11, 1, "val", ["the dog"]),
        ref(3, 12, 2, "val", ["missing picture"]),
        ref(4, 13, 3, "val", ["corrupt picture"]),
        ref(5, 14, 4, "val", ["wrong size"]),
        ref(6, 10, 1, "train", ["a training expression"]),
    ]
    d = root / "refcocog"
    d.mkdir(parents=True)
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    (d / "refs(umd).p").write_bytes(pickle.dumps(refs, protocol=2))
    square = np.zeros((H, W), bool)
    square[3:9, 2:12] = True
    return {"1-100": square, "1-101": square, "2-200": rle_mask}


def test_refcocog_one_row_per_expression(tmp_path: Path) -> None:
    expected = refcocog_tree(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(CommandError, match=r"refs\(umd\)\.p is a Python pickle.*--trust-pickle"):
        cli(
            ["data", "import", "--format", "refcocog", "--src", str(tmp_path / "refcocog"), "--out", str(out)]
        )
    cli(["data", "import", "--format", "refcocog", "--src", str(tmp_path / "refcocog"), "--out", str(out),
         "--trust-pickle", "--no-progress"])  # fmt: skip
    rows = {r.id: r for r in read_rows(out)}
    assert sorted(rows) == sorted(f"refcocog/val/{k}" for k in expected)
    for key, mask in expected.items():
        row = rows[f"refcocog/val/{key}"]
        assert row.task == "referring" and np.array_equal(decode_mask(row.mask), mask)
    # The reference's RefCOCO wording: "Identify and segment " + the expression as written (no full stop added).
    assert rows["refcocog/val/1-100"].instruction == "Identify and segment the man on the left"
    assert skipped(out) == {
        ("COCO_train2014_000000000002.jpg", "missing image"),
        ("COCO_train2014_000000000003.jpg", "corrupt image"),
        ("COCO_train2014_000000000004.jpg", "size mismatch"),
    }


def test_refs_pickle_with_code_is_refused(tmp_path: Path) -> None:
    refcocog_tree(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "refcocog/refs(umd).p").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(ImportError_, match="not a readable REFER refs pickle"):
        import_dataset(
            ImportOptions("refcocog", tmp_path / "o", src=tmp_path / "refcocog", trust_pickle=True)
        )


# ------------------------------------------------------------------------------------------------------------
# ReasonSeg


def test_reasonseg_json_polygons(tmp_path: Path) -> None:
    val = tmp_path / "ReasonSeg/val"
    write_image(val / "a.jpg", seed=1)
    shapes = [
        {"label": "target", "points": [[2, 2], [20, 2], [20, 15], [2, 15]], "shape_type": "polygon"},
        {"label": "ignore", "points": [[4, 4], [8, 4], [8, 8], [4, 8]], "shape_type": "polygon"},
        {"label": "flag", "points": [[0, 0], [1, 0], [1, 1]], "shape_type": "polygon"},
    ]
    (val / "a.json").write_text(
        json.dumps({"text": ["What keeps the rain off?", "other"], "is_sentence": True, "shapes": shapes})
    )
    write_image(val / "b.jpg", seed=2)
    (val / "b.json").write_text(json.dumps({"text": ["the cat"], "is_sentence": False, "shapes": shapes[:1]}))
    (val / "c.json").write_text(json.dumps({"text": ["no image"], "shapes": shapes}))  # missing image
    write_image(val / "d.jpg", seed=4)  # missing annotation
    write_image(val / "e.jpg", seed=5)
    (val / "e.json").write_text("{not json")  # corrupt annotation
    out = tmp_path / "out"
    report = import_dataset(ImportOptions("reasonseg", out, src=tmp_path / "ReasonSeg", progress=False))
    rows = {r.id: r for r in read_rows(out)}
    assert sorted(rows) == ["reasonseg/val/a", "reasonseg/val/b"] and report.imported == 2
    assert rows["reasonseg/val/a"].instruction == "What keeps the rain off? Identify and segment it."
    assert rows["reasonseg/val/b"].instruction == "Identify and segment the cat."
    assert rows["reasonseg/val/a"].task == "reasoning"
    mask = decode_mask(rows["reasonseg/val/a"].mask)
    assert mask[10, 10] and not mask[6, 6]  # the ignore square (drawn after the larger target) is background
    assert np.array_equal(mask, render_shapes(shapes, H, W))
    assert skipped(out) == {
        ("c.json", "missing image"),
        ("d.jpg", "missing annotation"),
        ("e.json", "corrupt annotation"),
    }
    all_rows = import_dataset(
        ImportOptions(
            "reasonseg", tmp_path / "o2", src=tmp_path / "ReasonSeg", all_texts=True, progress=False
        )
    )
    assert all_rows.imported == 3


def test_two_data_sets_share_a_folder(tmp_path: Path) -> None:
    cod10k_tree(tmp_path / "COD10K-v3")
    build_pairs(tmp_path / "CAMO/Images/Train", tmp_path / "CAMO/GT", ["c1", "c2", "c3", "c4"])
    out = tmp_path / "rl-train"
    import_dataset(ImportOptions("cod10k", out, src=tmp_path / "COD10K-v3", progress=False))
    import_dataset(ImportOptions("camo", out, src=tmp_path / "CAMO", progress=False))
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "camo-train-00000-of-00001.parquet",
        "cod10k-train-00000-of-00001.parquet",
    ]
    assert len(read_rows(out)) == 4
    assert {p.name for p in out.glob("_import_*.json")} == {
        "_import_cod10k-train.json",
        "_import_camo-train.json",
    }


def test_cli_lists_every_importer() -> None:
    from cluster.commands.data_import import FORMATS
    from cluster.data.importers import ALL_FORMATS

    assert tuple(FORMATS) == tuple(ALL_FORMATS)
