"""Rows with images: both shapes load to canonical vision rows; a bad image row is dropped and
counted with an error naming the data file, the row and the image path (or stops --strict)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from tuneforge.data.images import row_images
from tuneforge.data.load import DataError, load_rows


def _png_b64(colour=(0, 0, 255)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_llava_and_openai_shapes_load_with_paths_relative_to_the_data_file(shapes, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)  # relative image paths are read from the data file's folder, not the cwd
    for key, fmt in (("llava", "vision_sharegpt"), ("chat", "vision_chat")):
        rows, report = load_rows([str(shapes[key])], kind="vision")
        assert report.format == fmt and report.kept == report.read == 24
        user, answer = rows[0]["messages"]
        assert [p["type"] for p in user["content"]] == ["image", "text"]
        assert answer["content"][0]["text"].startswith("a ")
        (image,) = row_images(rows[0])
        assert image == str((shapes[key].parent / "images").resolve() / image.rsplit("/", 1)[-1])


def test_base64_and_data_uris(tmp_path):
    b64 = _png_b64()
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "colour?"}]},
                          {"role": "assistant", "content": "blue"}]}
            for url in (f"data:image/png;base64,{b64}", b64)]
    rows.append({"conversations": [{"from": "human", "value": "<image> colour?"}, {"from": "gpt", "value": "blue"}],
                 "images": [b64]})
    out, report = load_rows([_write(tmp_path / "a.jsonl", rows[:2])], kind="vision")
    assert report.kept == 2 and all(row_images(r)[0] == f"data:image/png;base64,{b64}" for r in out)
    out, report = load_rows([_write(tmp_path / "b.jsonl", rows[2:])], kind="vision")
    assert report.kept == 1 and row_images(out[0])[0].startswith("data:image/png;base64,")


def test_bad_image_rows_name_file_row_and_path(shapes, tmp_path):
    good = json.loads(shapes["llava"].read_text().splitlines()[0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [good,
            {**good, "image": "images/nope.png"},  # line 2: missing
            {**good, "image": "broken.png"},  # line 3: unreadable (relative to this data file's folder)
            {**good, "image": None, "images": [good["image"], good["image"]]}]  # line 4: 1 marker, 2 images
    rows[2]["image"] = str(tmp_path / "broken.png")
    data = _write(shapes["llava"].parent / "bad.jsonl", rows)
    _, report = load_rows([data], kind="vision")
    assert report.read == 4 and report.kept == 1 and sum(report.dropped.values()) == 3  # nothing dropped silently
    details = [d for ex in report.examples.values() for d in ex]
    missing = next(d for d in details if "missing image" in d)
    assert missing.startswith(f"{data}:2: field 'image'") and str(shapes["llava"].parent / "images/nope.png") in missing
    unreadable = next(d for d in details if "unreadable image" in d)
    assert unreadable.startswith(f"{data}:3: field 'image'") and str(tmp_path / "broken.png") in unreadable
    mismatch = next(d for d in details if "markers do not match" in d)
    assert mismatch.startswith(f"{data}:4: field 'conversations'") and "1 in the turns, 2 in 'images'" in mismatch
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'image': missing image file '.*images/nope.png'"):
        load_rows([data], kind="vision", strict=True)


def test_openai_image_part_errors_and_text_runs_still_refuse_images(shapes, tmp_path):
    row = json.loads(shapes["chat"].read_text().splitlines()[0])
    row["messages"][0]["content"][0]["image_url"]["url"] = "https://example.com/cat.png"
    data = _write(tmp_path / "remote.jsonl", [row])
    with pytest.raises(DataError, match=r"remote.jsonl:1: field 'messages\[0\]\.content\[0\]\.image_url': remote "
                                        r"image https://example.com/cat.png is not fetched"):
        load_rows([data], kind="vision", strict=True)
    # A text (sft) run never drops the images silently: the image parts are refused with the reason.
    with pytest.raises(DataError, match=r"only text parts are trained here, got 'image_url' \(rows with images train "
                                        r"with model.kind=vision"):
        load_rows([str(shapes["chat"])], kind="sft")
    with pytest.raises(DataError, match=r"rows carry 'image'|rows carry 'images'|no known format"):
        load_rows([str(shapes["llava"])], kind="sft")


def test_pii_redaction_rewrites_text_parts_and_never_image_data():
    from tuneforge.data.pii import PIIOptions, pii_rows

    image = "data:image/png;base64,AKIAABCDEFGHIJKLMNOP+GB82WEST12345698765432/token=Zm9vYmFyYmF6cXV4MTIz"
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": "from jo@example.com: what is it?"}]},
                        {"role": "assistant", "content": "a red square"}]}
    [out], stage = pii_rows([row], PIIOptions())
    parts = out["messages"][0]["content"]
    assert parts[0] == {"type": "image", "image": image}  # secret-like and IBAN-like base64 left alone
    assert parts[1]["text"] == "from <EMAIL>: what is it?" and stage.info["found"] == {"EMAIL": 1}
