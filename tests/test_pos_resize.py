"""Position-table resizing against independent references.

- `simmim_rpb_interp.npz` (copied from shared/reference): outputs of the official SimMIM
  `remap_pretrained_keys_swin` / `remap_pretrained_keys_vit` (scipy 1.13 `interp2d`).
- `torch_bicubic_resize.npz`: PyTorch 2.13 bicubic resizes as in MAE's `interpolate_pos_embed`,
  generated once (torch is not a dependency) with:

      rng = np.random.default_rng(0)
      for src, dst, ch in [(7, 9, 3), (14, 16, 4), (4, 3, 2), (2, 5, 1)]:
          pos = rng.standard_normal((src * src, ch)).astype(np.float32)
          grid = torch.from_numpy(pos).reshape(1, src, src, ch).permute(0, 3, 1, 2)
          res = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
          out[f"s{src}_d{dst}_src"] = pos
          out[f"s{src}_d{dst}_dst"] = res.permute(0, 2, 3, 1).reshape(dst * dst, ch).numpy()
      np.savez_compressed("torch_bicubic_resize.npz", **out)
"""

import json
import pathlib

import numpy as np
import pytest

from mim_jax.models import pos_resize

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def rpb() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "simmim_rpb_interp.npz") as data:
        return dict(data)


def _cases(rpb: dict[str, np.ndarray], kind: str) -> list[dict]:
    return [c for c in json.loads(str(rpb["meta_json"])) if c["kind"] == kind]


def test_swin_tables_match_official(rpb):
    cases = _cases(rpb, "swin")
    assert {(c["src_window"], c["dst_window"]) for c in cases} == {(6, 7), (12, 14), (3, 4), (7, 7)}
    for case in cases:
        name = case["name"]
        out = pos_resize.resize_rel_pos_table(rpb[f"{name}_src"], case["dst_window"])
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, rpb[f"{name}_dst"], atol=1e-5, rtol=0, err_msg=name)


def test_vit_tables_match_official(rpb):
    cases = _cases(rpb, "vit_shared")
    assert {(c["src_grid"], c["dst_grid"]) for c in cases} == {(12, 14), (14, 14)}
    for case in cases:
        name, extra = case["name"], case["extra_tokens"]
        src = rpb[f"{name}_src"]
        out = pos_resize.resize_rel_pos_table_with_extra(src, case["dst_grid"], extra)
        assert out.shape == ((2 * case["dst_grid"] - 1) ** 2 + extra, case["heads"])
        np.testing.assert_array_equal(out[-extra:], src[-extra:])
        for block in range(case["depth"]):
            expected = rpb[f"{name}_dst_block{block}"]
            np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0, err_msg=f"{name} {block}")


def test_rel_table_identity_is_exact_copy():
    table = np.random.default_rng(1).standard_normal((13 * 13, 3)).astype(np.float32)
    out = pos_resize.resize_rel_pos_table(table, 7)
    np.testing.assert_array_equal(out, table)
    assert out is not table
    with_extra = np.concatenate([table, np.ones((3, 3), np.float32)])
    np.testing.assert_array_equal(
        pos_resize.resize_rel_pos_table_with_extra(with_extra, 7), with_extra
    )


def test_rel_table_constant_stays_constant():
    table = np.full((11 * 11, 2), 0.25, np.float32)
    np.testing.assert_allclose(pos_resize.resize_rel_pos_table(table, 8), 0.25, atol=1e-6)


@pytest.mark.parametrize(
    ("rows", "dst", "match"),
    [(120, 7, "not a square"), (16 * 16, 7, "2 \\* window - 1"), (9, 4, "window >= 3")],
)
def test_rel_table_rejects_bad_shapes(rows, dst, match):
    with pytest.raises(ValueError, match=match):
        pos_resize.resize_rel_pos_table(np.zeros((rows, 2), np.float32), dst)


def test_rel_table_rejects_1d():
    with pytest.raises(ValueError, match="2-D"):
        pos_resize.resize_rel_pos_table(np.zeros(121, np.float32), 7)


def test_abs_pos_embed_matches_torch_bicubic():
    with np.load(FIXTURES / "torch_bicubic_resize.npz") as data:
        fixture = dict(data)
    names = [k[: -len("_src")] for k in fixture if k.endswith("_src")]
    assert sorted(names) == ["s14_d16", "s2_d5", "s4_d3", "s7_d9"]
    for name in names:
        dst = int(name.split("_d")[1])
        out = pos_resize.resize_abs_pos_embed(fixture[f"{name}_src"], dst)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, fixture[f"{name}_dst"], atol=1e-5, rtol=0, err_msg=name)


def test_abs_pos_embed_keeps_extra_rows_and_identity():
    rng = np.random.default_rng(2)
    pos = rng.standard_normal((1 + 6 * 6, 5)).astype(np.float32)
    np.testing.assert_array_equal(pos_resize.resize_abs_pos_embed(pos, 6, num_extra=1), pos)
    out = pos_resize.resize_abs_pos_embed(pos, 8, num_extra=1)
    assert out.shape == (1 + 8 * 8, 5)
    np.testing.assert_array_equal(out[:1], pos[:1])
    np.testing.assert_allclose(out[1:], pos_resize.resize_abs_pos_embed(pos[1:], 8), atol=0)


def test_abs_pos_embed_hand_computed_upsample():
    """A 2 -> 4 resize of the grid g[y, x] = x: source x coordinates -0.25, 0.25, 0.75, 1.25.
    Keys' kernel (a = -0.75) by hand: w(0.25) = 0.87890625, w(0.75) = 0.26171875,
    w(1.25) = -0.10546875, w(1.75) = -0.03515625; clamped taps give the expected columns
    (the y direction is constant and the weights sum to 1)."""
    grid = np.tile(np.array([0.0, 1.0], np.float32), (2, 1)).reshape(4, 1)
    out = pos_resize.resize_abs_pos_embed(grid, 4).reshape(4, 4)
    # dst 0: t = 0.75 from floor -1, taps -2..1 -> clamped 0, 0, 0, 1 with weights
    # w(1.75), w(0.75), w(0.25), w(1.25): value = w(1.25).
    # dst 1: t = 0.25 from floor 0, taps -1..2 -> 0, 0, 1, 1: value = w(0.75) + w(1.75).
    expected = np.array([-0.10546875, 0.2265625, 0.7734375, 1.10546875])
    np.testing.assert_allclose(out, np.tile(expected, (4, 1)), atol=1e-7)


def test_abs_pos_embed_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not a square"):
        pos_resize.resize_abs_pos_embed(np.zeros((1 + 16, 4), np.float32), 4, num_extra=0)
    with pytest.raises(ValueError, match="num_extra"):
        pos_resize.resize_abs_pos_embed(np.zeros((4, 4), np.float32), 4, num_extra=4)
