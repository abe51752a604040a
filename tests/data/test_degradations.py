"""Every degradation against its definition (kontext_data.degradations)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from kontext_data import degradations as D


def _photo(h=96, w=128, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.add(img, rng.integers(0, 40, img.shape, dtype=np.uint8))


def _chain(name, **params):
    return D.resolve_chain([(name, params)])


def _run(img, chain, seed=0, encode_last=False):
    return D.apply_chain(img, chain, np.random.default_rng(seed), encode_last=encode_last)


@pytest.fixture(scope="module")
def pil_tables():
    """Quantization tables libjpeg writes for each quality (from Pillow, an independent encoder path)."""
    img = Image.fromarray(_photo(16, 16))
    out = {}
    for q in range(1, 101):
        b = io.BytesIO()
        img.save(b, "JPEG", quality=q)
        out[q] = Image.open(io.BytesIO(b.getvalue())).quantization
    return out


def _quality_of(data: bytes, tables) -> int:
    qt = Image.open(io.BytesIO(data)).quantization
    hits = [q for q, t in tables.items() if t == qt]
    assert hits, "tables match no libjpeg quality"
    return hits[0]


@pytest.mark.parametrize("q", [10, 37, 90])
def test_jpeg_fixed_quality_decodes_to_quality_asked(q, pil_tables):
    _, data = _run(_photo(), _chain("jpeg", quality=q), encode_last=True)
    assert data[:2] == b"\xff\xd8"
    assert _quality_of(data, pil_tables) == q


def test_jpeg_rounds_follow_decay_and_are_real_recompressions(pil_tables):
    img = _photo()
    chain = _chain("jpeg_artifacts", quality=40, compression_rounds=3, round_quality_decay=0.5)
    _, data = _run(img, chain, encode_last=True)
    # rounds: 40, int(40*.5)=20, int(40*.25)=10; the file holds the last round's tables
    assert [D.jpeg_quality_for_round(40, r, 0.5) for r in range(3)] == [40, 20, 10]
    assert _quality_of(data, pil_tables) == 10
    manual = img
    for q in (40, 20, 10):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(manual, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        manual = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    assert buf.tobytes() == data  # exactly three encode rounds, no extra pass
    assert np.array_equal(_run(img, chain), manual)


def test_jpeg_range_and_random_modes_draw_from_their_sets(pil_tables):
    img = _photo(32, 32)
    seen_range = {_quality_of(_run(img, _chain("jpeg", quality_mode="range", quality_range=[10, 30]), s,
                                   True)[1], pil_tables) for s in range(30)}
    assert seen_range <= set(range(10, 31)) and len(seen_range) > 5
    seen_list = {_quality_of(_run(img, _chain("jpeg", quality_mode="random", quality_list=[15, 55]), s,
                                  True)[1], pil_tables) for s in range(20)}
    assert seen_list == {15, 55}


@pytest.mark.parametrize("sub,code", [("4:4:4", 0), ("4:2:2", 1), ("4:2:0", 2)])
def test_jpeg_subsampling(sub, code):
    _, data = _run(_photo(), _chain("jpeg", quality=50, subsampling=sub), encode_last=True)
    assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(data))) == code


def test_jpeg_decoders_agree_so_any_loader_sees_the_same_pixels():
    img = _photo()
    _, data = _run(img, _chain("jpeg", quality=20), encode_last=True)
    ours = D.decode_image_bytes(data)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(ours, pil)
    assert np.array_equal(_run(img, _chain("jpeg", quality=20)), ours)


def _impulse(size=65):
    img = np.zeros((size, size, 3), np.uint8)
    img[size // 2, size // 2] = 255
    return img


def _spread(out: np.ndarray) -> tuple[float, float]:
    w = out[..., 0].astype(np.float64)
    w /= w.sum()
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    my, mx = (w * ys).sum(), (w * xs).sum()
    return float((w * (xs - mx) ** 2).sum()), float((w * (ys - my) ** 2).sum())


def _np_gaussian(img: np.ndarray, sigma: float) -> np.ndarray:
    """Independent float reference: separable Gaussian of std ``sigma`` (4-sigma support, mirror borders)."""
    r = int(np.ceil(4 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    a = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    a = sum(k[i] * a[:, i: i + img.shape[1] + 0, :] for i in range(2 * r + 1))[:, : img.shape[1]]
    a = sum(k[i] * a[i: i + img.shape[0], :, :] for i in range(2 * r + 1))
    return a


@pytest.mark.parametrize("radius", [1.5, 3.0, 5.0])
def test_gaussian_blur_radius_is_the_sigma(radius):
    img = np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    out = _run(img, _chain("blur", blur_radius=radius, add_noise=False)).astype(np.float64)
    err = np.abs(out - _np_gaussian(img, radius))
    assert err.mean() < 0.6 and err.max() <= 2.5
    wrong = np.abs(out - _np_gaussian(img, radius * 1.25))
    assert wrong.mean() > 2 * err.mean()  # the check does distinguish a different sigma


def test_box_blur_is_a_uniform_square_of_half_width_radius():
    img = np.zeros((33, 33, 3), np.uint8)
    img[16, 16] = 250
    out = _run(img, _chain("blur", blur_type="box", blur_radius=2, add_noise=False))[..., 0]
    assert np.all(out[14:19, 14:19] == 10) and out.sum() == 250


def test_motion_blur_is_a_line_at_the_angle():
    horiz = _run(_impulse(), _chain("blur", blur_type="motion", motion_length=15, motion_angle=0,
                                    add_noise=False)).astype(float)
    vx, vy = _spread(horiz + 1e-9)
    assert vx > 10 and vy < 0.5  # a line of 15 px has variance (15^2-1)/12 ~ 18.7 along it
    vert = _run(_impulse(), _chain("blur", blur_type="motion", motion_length=15, motion_angle=90,
                                   add_noise=False)).astype(float)
    vx, vy = _spread(vert + 1e-9)
    assert vy > 10 and vx < 0.5
    k = D.motion_kernel(10, 45)
    assert k.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(k, k.T[::-1, ::-1], atol=1e-6)  # diagonal line: symmetric about the anti-diagonal


def test_blur_radius_orders_high_frequency_energy():
    img = _photo(128, 128)

    def hf(a):
        return float(cv2.Laplacian(a[..., 1].astype(np.float32), cv2.CV_32F).var())

    energies = [hf(_run(img, _chain("blur", blur_radius=r, add_noise=False))) for r in (0.5, 1, 2, 4)]
    assert energies == sorted(energies, reverse=True) and energies[-1] < hf(img) / 20


def test_gaussian_noise_std_matches_level_in_every_channel():
    grey = np.full((256, 256, 3), 128, np.uint8)
    out = _run(grey, _chain("noise", noise_level=0.05)).astype(np.float64) - 128
    for c in range(3):
        assert out[..., c].std() == pytest.approx(0.05 * 255, rel=0.03)
        assert abs(out[..., c].mean()) < 0.2
    corr = np.corrcoef(out[..., 0].ravel(), out[..., 1].ravel())[0, 1]
    assert abs(corr) < 0.02  # independent per channel


def test_poisson_noise_std_scales_with_sqrt_intensity():
    level = 0.1
    for v in (64, 128):
        img = np.full((256, 256, 3), v, np.uint8)
        out = _run(img, _chain("noise", noise_type="poisson", noise_level=level)).astype(np.float64)
        expected = np.sqrt(v / 255) * level * 255
        assert out.std() == pytest.approx(expected, rel=0.06)
        assert out.mean() == pytest.approx(v, abs=1.0)


def test_blur_add_noise_is_the_guide_default():
    img = np.full((64, 64, 3), 100, np.uint8)
    out = _run(img, _chain("superresolution"))  # SimpleTuner defaults: radius 2, noise 0.02 on
    assert out.astype(float).std() == pytest.approx(0.02 * 255, rel=0.1)


def test_downscale_removes_detail_and_can_keep_the_small_image():
    checker = np.indices((64, 64)).sum(0) % 2 * 255
    img = np.repeat(checker[..., None], 3, axis=2).astype(np.uint8)
    same = _run(img, _chain("downscale", factor=2))
    assert same.shape == img.shape and np.abs(same.astype(int) - 128).max() <= 1  # area average: flat grey
    small = _run(img, _chain("downscale", factor=4, restore_size=False))
    assert small.shape == (16, 16, 3)
    blurred_sr = _run(_photo(), _chain("blur", blur_radius=0, add_noise=False, downscale_factor=4))
    assert blurred_sr.shape == _photo().shape


def test_same_rng_same_pixels_and_input_untouched():
    img = _photo()
    before = img.copy()
    chain = D.resolve_chain([("blur", {"blur_type": "motion"}), ("noise", {}), ("jpeg", {"quality_mode": "range"})])
    a, b, c = _run(img, chain, 7), _run(img, chain, 7), _run(img, chain, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(img, before)


def test_blur_with_final_jpeg_pass_returns_those_exact_bytes():
    img = _photo()
    chain = _chain("blur", blur_radius=1, jpeg_quality=30)
    assert D.chain_output_codec(chain) == "jpeg"
    _, data = _run(img, chain, 3, encode_last=True)
    assert np.array_equal(D.decode_image_bytes(data), _run(img, chain, 3))
    assert D.chain_output_codec(_chain("blur")) == "png"
    pixels, none = _run(img, _chain("blur"), 3, encode_last=True)
    assert none is None and np.array_equal(pixels, _run(img, _chain("blur"), 3))


def test_pil_images_are_accepted():
    img = _photo()
    chain = _chain("noise")
    assert np.array_equal(_run(Image.fromarray(img), chain), _run(img, chain))


def test_defaults_and_aliases_are_simpletuners():
    (sr,) = _chain("superresolution")
    assert sr.type == "blur"
    assert sr.params["blur_radius"] == 2.0 and sr.params["blur_type"] == "gaussian"
    assert sr.params["add_noise"] is True and sr.params["noise_level"] == 0.02
    assert sr.params["downscale_factor"] is None and sr.params["jpeg_quality"] is None
    (ja,) = _chain("jpeg_artifacts")
    assert ja.type == "jpeg"
    assert (ja.params["quality_mode"], ja.params["quality"], ja.params["quality_range"],
            ja.params["compression_rounds"], ja.params["round_quality_decay"], ja.params["subsampling"]) == \
        ("fixed", 25, [10, 50], 1, 0.9, None)
    assert set(D.REGISTRY) == {"blur", "jpeg", "noise", "downscale"}


def test_every_problem_is_reported_at_once_with_the_valid_values():
    with pytest.raises(D.ChainError) as e:
        D.resolve_chain([("blurr", {}), ("blur", {"blur_type": "median", "radius": 2}),
                         ("jpeg", {"quality": 0, "quality_range": [30, 10], "subsampling": "4:1:1"})])
    text = str(e.value)
    probs = e.value.problems
    assert len(probs) == 6
    assert "unknown degradation type 'blurr'" in text and "superresolution (= blur)" in text
    assert "'median' is not valid; valid values: gaussian, box, motion, both" in text
    assert "unknown parameter 'radius'" in text and "blur_radius" in text
    assert "jpeg.quality: 0 is out of range" in text
    assert "low <= high" in text
    assert "valid values: 4:4:4, 4:2:2, 4:2:0, null" in text


def test_chain_hash_tracks_every_parameter():
    base = D.chain_hash(_chain("jpeg"))
    assert base == D.chain_hash(_chain("jpeg_artifacts", quality=25))  # defaults spelled out: same hash
    assert base != D.chain_hash(_chain("jpeg", quality=26))
    assert base != D.chain_hash(_chain("jpeg", subsampling="4:4:4"))
    assert D.chain_hash(_chain("blur")) != D.chain_hash(_chain("blur", noise_level=0.03))


def test_parameter_specs_cover_every_type_and_upscale_method():
    """The declarations `kontext-data degrade` builds its options from describe exactly what the code implements."""
    from kontext_data.degrade_params import PARAM_SPECS, UPSCALE_METHODS, canonical_type

    assert set(D.REGISTRY) == set(PARAM_SPECS)
    assert canonical_type("JPEG_Artifacts") == "jpeg" and canonical_type("sharpen") is None
    img = np.full((16, 16, 3), 128, np.uint8)
    for method in UPSCALE_METHODS:  # every declared choice runs
        out = D.apply_chain(img, D.resolve_chain([("downscale", {"factor": 2, "upscale": method})]),
                            np.random.default_rng(0))
        assert out.shape == img.shape
