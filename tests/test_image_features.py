"""`run.py prepare images`: reading folders and tars, the HSV histogram and tiny-CLIP encoders."""

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recbole_ext.data import prepare
from recbole_ext.data.features import load_item_features
from recbole_ext.data.images import ImageSource, color_histogram
from recbole_ext.errors import UserError

SHARED = Path(
    os.environ.get("UR4REC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
POSTERS = SHARED / "ml-1m-posters" / "ml1m_posters_96x144.tar"

RED_BIN = 0 * 64 + 7 * 8 + 7    # PIL HSV of pure red: hue 0, saturation 255, value 255
WHITE_BIN = 0 * 64 + 0 * 8 + 7  # white: hue 0, saturation 0, value 255


def solid(colour, size=(12, 10)):
    return Image.new("RGB", size, colour)


def half_red_half_white():
    image = solid((255, 0, 0))
    image.paste((255, 255, 255), (0, 0, 6, 10))
    return image


@pytest.fixture
def toy(tmp_path):
    """Dataset items 1-5 (4 and 5 only in the .inter); images for 1, 2, 5 and a non-item 99."""
    dataset = tmp_path / "toy"
    dataset.mkdir()
    (dataset / "toy.item").write_text("item_id:token\n1\n2\n3\n")
    (dataset / "toy.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t1\n1\t4\t2\n2\t5\t3\n"
    )
    folder = tmp_path / "images"
    folder.mkdir()
    solid((255, 0, 0)).save(folder / "1.png")
    half_red_half_white().save(folder / "2.png")
    gradient = np.linspace(0, 255, 16 * 24 * 3).reshape(16, 24, 3).astype(np.uint8)
    Image.fromarray(gradient).save(folder / "5.jpg", quality=90)
    solid((0, 0, 255)).save(folder / "99.png")
    (folder / "notes.txt").write_text("not an image, ignored")

    tar = tmp_path / "images.tar"
    with tarfile.open(tar, "w") as f:
        for path in sorted(folder.iterdir()):
            f.add(path, arcname=f"./{path.name}")
    return dataset, folder, tar


# ---------------------------------------------------------------- color histogram

def test_solid_colour_puts_all_mass_in_one_bin():
    hist = color_histogram([solid((255, 0, 0)), solid((255, 255, 255), size=(3, 7))])
    assert hist.shape == (2, 512) and hist.dtype == np.float32
    assert hist[0, RED_BIN] == 1.0 and hist[0].sum() == 1.0
    assert hist[1, WHITE_BIN] == 1.0 and hist[1].sum() == 1.0


def test_histogram_counts_every_pixel_and_has_unit_norm():
    hist = color_histogram([half_red_half_white()])[0]
    assert np.nonzero(hist)[0].tolist() == [WHITE_BIN, RED_BIN]
    assert np.allclose(hist[[WHITE_BIN, RED_BIN]], 1 / np.sqrt(2))

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    hist = color_histogram([noise])[0]
    assert np.isclose(np.linalg.norm(hist), 1.0)
    # Against a plain per-pixel count, and scaled back the counts add up to every pixel.
    hsv = np.asarray(noise.convert("HSV")).reshape(-1, 3) // 32
    expected = np.zeros((8, 8, 8))
    np.add.at(expected, tuple(hsv.T), 1)
    assert np.allclose(hist, expected.ravel() / np.linalg.norm(expected))
    assert np.isclose((hist * np.linalg.norm(expected)).sum(), 20 * 30)


# ---------------------------------------------------------------- the command

def test_folder_and_tar_give_the_same_file(toy, tmp_path, capsys):
    dataset, folder, tar = toy
    prepare.main(["images", "--encoder", "color_histogram", "--images", str(folder),
                  "--dataset-dir", str(dataset), "--out", str(tmp_path / "folder.npz")])
    out = capsys.readouterr().out
    assert "for 3 items, 2 items without an image (marked unavailable), 1 images skipped" in out
    assert "folder.npz" in out
    prepare.build_image_features(tar, dataset, tmp_path / "tar.npz", batch_size=2)

    with np.load(tmp_path / "folder.npz") as a, np.load(tmp_path / "tar.npz") as b:
        assert a["ids"].tolist() == b["ids"].tolist() == ["1", "2", "5"]
        assert a["emb"].dtype == np.float32 and a["emb"].shape == (3, 512)
        assert np.array_equal(a["emb"], b["emb"])
        assert a["emb"][0, RED_BIN] == 1.0


def test_items_without_an_image_are_unavailable(toy, tmp_path):
    dataset, folder, _ = toy
    out = prepare.build_image_features(folder, dataset, tmp_path / "img.npz").path

    emb, available = load_item_features(out, ["[PAD]", "5", "4", "1", "2"], width=512,
                                        extra_known_tokens=["3"])
    assert available.tolist() == [False, True, False, True, True]
    assert emb[2].abs().sum() == 0 and emb[0].abs().sum() == 0
    assert torch.allclose(emb[[1, 3, 4]].norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("container", ["folder", "tar"])
def test_a_corrupt_image_is_an_error_naming_it(toy, tmp_path, damage, container):
    dataset, folder, _ = toy
    good = (folder / "5.jpg").read_bytes()
    (folder / "5.jpg").write_bytes(b"not a jpeg" if damage == "garbage" else good[: len(good) // 2])
    source = folder
    if container == "tar":
        source = tmp_path / "broken.tar"
        with tarfile.open(source, "w") as f:
            f.add(folder / "5.jpg", arcname="posters/5.jpg")
    out = tmp_path / "x.npz"
    where = "broken.tar:posters/5.jpg" if container == "tar" else "images/5.jpg"
    with pytest.raises(UserError, match=rf"Image .*{where} could not be read"):
        prepare.build_image_features(source, dataset, out)
    assert not out.exists()


def test_bad_arguments_are_user_errors(toy, tmp_path):
    dataset, folder, _ = toy
    out = tmp_path / "x.npz"
    with pytest.raises(UserError, match="--encoder clip needs --model"):
        prepare.main(["images", "--encoder", "clip", "--images", str(folder),
                      "--dataset-dir", str(dataset), "--out", str(out)])
    with pytest.raises(UserError, match=r"nowhere.*neither"):
        prepare.build_image_features(tmp_path / "nowhere", dataset, out)
    other = tmp_path / "other"
    other.mkdir()
    solid((0, 0, 0)).save(other / "42.png")
    with pytest.raises(UserError, match=r"None of the 1 images"):
        prepare.build_image_features(other, dataset, out)
    solid((0, 0, 0)).save(folder / "1.jpg")
    with pytest.raises(UserError, match=r"two images for item '1'"):
        ImageSource(folder)
    assert not out.exists()


# ---------------------------------------------------------------- tiny CLIP

def save_tiny_clip(folder: Path, projection_dim: int) -> Path:
    """A randomly initialised CLIP small enough to run in a test, saved like a real one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=100, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(tower, image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_tiny_clip_rows_are_finite_and_unit_norm(toy, tmp_path):
    dataset, _, tar = toy
    model = save_tiny_clip(tmp_path / "clip", projection_dim=512)
    result = prepare.build_image_features(tar, dataset, tmp_path / "clip.npz", encoder="clip",
                                          model=str(model), batch_size=2)
    assert (result.rows, result.dim) == (3, 512)
    with np.load(result.path) as npz:
        emb = npz["emb"]
        assert npz["ids"].tolist() == ["1", "2", "5"]
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    assert np.isfinite(emb).all() and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_clip_of_another_width_is_written_with_a_note(toy, tmp_path, capsys):
    dataset, folder, _ = toy
    model = save_tiny_clip(tmp_path / "clip16", projection_dim=16)
    out = tmp_path / "clip16.npz"
    prepare.main(["images", "--encoder", "clip", "--model", str(model), "--images", str(folder),
                  "--dataset-dir", str(dataset), "--out", str(out)])
    assert "model.image_dim=16" in capsys.readouterr().out
    emb, available = load_item_features(out, ["[PAD]", "1", "2", "4", "5"], width=16,
                                        extra_known_tokens=["3"])
    assert available.tolist() == [False, True, True, False, True]


def test_missing_clip_model_names_it(toy, tmp_path):
    dataset, folder, _ = toy
    with pytest.raises(UserError, match=r"CLIP model .*no-such-clip could not be loaded"):
        prepare.build_image_features(folder, dataset, tmp_path / "x.npz", encoder="clip",
                                     model=str(tmp_path / "no-such-clip"))


# ---------------------------------------------------------------- the real posters

@pytest.mark.skipif(not POSTERS.is_file(), reason=f"ML-1M posters not found at {POSTERS}")
def test_first_real_posters(tmp_path):
    with tarfile.open(POSTERS) as f:
        ids = [Path(m.name).stem for m in f.getmembers() if m.isfile()][:50]
    dataset = tmp_path / "posters50"
    dataset.mkdir()
    (dataset / "posters50.item").write_text("item_id:token\n" + "\n".join(ids) + "\n")

    result = prepare.build_image_features(POSTERS, dataset, tmp_path / "img.npz")
    assert (result.rows, result.without_image, result.skipped) == (50, 0, 3256 - 50)
    emb, available = load_item_features(result.path, ["[PAD]", *ids], width=512)
    assert available[1:].all()
    assert torch.allclose(emb[1:].norm(dim=1), torch.ones(50), atol=1e-5)
    assert len(torch.unique(emb[1:], dim=0)) == 50  # no two posters collapse to one histogram
