"""Image loading (modes, EXIF, broken files) and folder scanning, on real files."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_core.data.images import ImageError, image_size, image_to_tensor, load_image
from trainer_core.data.scan import IMAGE_EXTENSIONS, scan_folder


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def _noise(w=32, h=24, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# ---- modes ---------------------------------------------------------------------------

def test_cmyk_converts_to_rgb(tmp_path):
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100)
    img = load_image(path)
    assert img.mode == "RGB"
    r, g, b = img.getpixel((4, 4))
    assert r > 230 and g < 30 and b < 30  # no cyan/magenta ink removed from white: red


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    assert Image.open(path).mode in {"I;16", "I"}
    img = load_image(path)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_palette_with_transparency_goes_on_white(tmp_path):
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = _save(img, tmp_path / "p.png", transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent black → white, not black
    assert out.getpixel((1, 0)) == (255, 0, 0)


def test_greyscale_alpha_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = load_image(_save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)
    rgba = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    r, g, b = load_image(_save(rgba, tmp_path / "rgba.png")).getpixel((0, 0))
    assert r == 255 and abs(g - 127) <= 2 and abs(b - 127) <= 2
    grey = load_image(_save(Image.new("L", (1, 1), 77), tmp_path / "l.png"))
    assert grey.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_exif_orientation_is_applied(tmp_path, ext):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display = rotate 90° clockwise: the left half ends up on top
    path = _save(img, tmp_path / f"rot.{ext}", exif=exif)
    assert image_size(path) == (20, 40)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    path = _save(_noise(2400, 1600), tmp_path / "big.jpg", quality=80)
    img = load_image(path, min_size=(500, 300))
    assert 500 <= img.size[0] <= 1200 and 300 <= img.size[1] <= 800
    assert load_image(path).size == (2400, 1600)


def test_image_to_tensor_range_and_shape():
    img = Image.new("RGB", (3, 2), (255, 255, 255))
    img.putpixel((0, 0), (0, 0, 0))
    t = image_to_tensor(img)
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[:, 0, 0].tolist() == [-1.0, -1.0, -1.0] and t[:, 1, 2].tolist() == [1.0, 1.0, 1.0]


# ---- broken files ----------------------------------------------------------------------

def _truncate(path, keep: float):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_file_raises_image_error_naming_it(tmp_path, ext):
    path = _save(_noise(64, 64), tmp_path / f"cut.{ext}")
    _truncate(path, 0.5)
    with pytest.raises(ImageError, match=rf"cut\.{ext}.*(re-export|delete)"):
        load_image(path)


def test_empty_and_non_image_files_raise_image_error(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*0 bytes"):
        image_size(empty)
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.jpg"):
        load_image(fake)
    assert issubclass(ImageError, ValueError)


# ---- scanning --------------------------------------------------------------------------

def test_scan_repeats_captions_hash_and_order(tmp_path):
    _save(_noise(seed=1), tmp_path / "b.PNG")
    (tmp_path / "b.txt").write_text("  a caption \n", encoding="utf-8")
    _save(_noise(seed=2), tmp_path / "10_sks dog" / "a.jpg")
    (tmp_path / "10_sks dog" / "a.txt").write_bytes("\ufeffcafé".encode("utf-8"))
    _save(_noise(seed=3), tmp_path / "3_x" / "deep" / "c.webp")
    _save(_noise(seed=4), tmp_path / ".latent_cache" / "hidden.png")
    (tmp_path / "readme.md").write_text("ignored")
    records = scan_folder(tmp_path)
    names = [r.path.relative_to(tmp_path).as_posix() for r in records]
    assert names == ["10_sks dog/a.jpg", "3_x/deep/c.webp", "b.PNG"]
    assert [r.repeats for r in records] == [10, 3, 1]
    assert [r.caption for r in records] == ["café", None, "a caption"]
    assert records[2].content_hash == hashlib.sha256((tmp_path / "b.PNG").read_bytes()).hexdigest()


def test_root_folder_name_does_not_count_as_repeats(tmp_path):
    root = tmp_path / "5_data"
    _save(_noise(), root / "a.png")
    assert scan_folder(root)[0].repeats == 1


def test_duplicate_stems_name_both_files(tmp_path):
    _save(_noise(), tmp_path / "a.png")
    _save(_noise(), tmp_path / "a.jpg")
    with pytest.raises(ValueError, match=r"a\.jpg.*a\.png|a\.png.*a\.jpg"):
        scan_folder(tmp_path)


@pytest.mark.parametrize("setup", ["empty", "missing", "only_text"])
def test_folder_without_images_names_folder_and_extensions(tmp_path, setup):
    folder = tmp_path / "data"
    if setup != "missing":
        folder.mkdir()
    if setup == "only_text":
        (folder / "a.txt").write_text("x")
        (folder / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError) as err:
        scan_folder(folder)
    msg = str(err.value)
    assert str(folder) in msg and all(ext in msg for ext in IMAGE_EXTENSIONS)


def test_custom_caption_extension(tmp_path):
    _save(_noise(), tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("hello")
    (tmp_path / "a.txt").write_text("wrong")
    assert scan_folder(tmp_path, caption_extension="caption")[0].caption == "hello"
    assert scan_folder(tmp_path, caption_extension=".md")[0].caption is None
