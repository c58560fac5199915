"""IDC regions (exact polygons of the thresholded map, checked with shapely) and the streamed GeoJSON."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from shapely.geometry import Point, Polygon, box, shape
from shapely.ops import unary_union

from cancernet_batch.geojson import idc_features, iter_idc_features, tile_polygon, write_geojson
from cancernet_batch.regions import find_regions, region_features, region_summary


def _regions(mask, probs=None, **kw):
    """Regions of a boolean grid; every cell is a scored tile (prob 0.9 where IDC, 0.1 elsewhere, unless given)."""
    mask = np.asarray(mask, bool)
    coords = np.argwhere(np.ones(mask.shape, bool))
    p = np.where(mask, 0.9, 0.1) if probs is None else np.asarray(probs)
    kw.setdefault("tile_area_mm2", 1.0)
    return find_regions(mask.shape, coords, p[coords[:, 0], coords[:, 1]], 0.5, **kw)


def _poly(region, s: float = 1.0) -> Polygon:
    return Polygon(region.shell * s, [h * s for h in region.holes])


def _tile_union(mask, s: float = 1.0):
    return unary_union([box(c * s, r * s, (c + 1) * s, (r + 1) * s) for r, c in np.argwhere(mask)])


def test_random_maps_give_valid_polygons_whose_union_is_the_idc_tiles_exactly():
    from scipy import ndimage

    rng = np.random.default_rng(18)
    for _ in range(40):
        mask = rng.random(tuple(rng.integers(2, 16, 2))) < rng.uniform(0.3, 0.8)
        regions = _regions(mask)
        polys = [_poly(r) for r in regions]
        assert all(p.is_valid for p in polys)
        assert [p.area for p in polys] == [r.tiles for r in regions]  # no region overlaps its holes
        assert unary_union(polys).area == mask.sum()  # exactly: integer corners
        assert unary_union(polys).symmetric_difference(_tile_union(mask)).area == 0
        # 4-connectivity: as many regions as edge-connected components, counted independently
        assert len(regions) == ndimage.label(mask, structure=[[0, 1, 0], [1, 1, 1], [0, 1, 0]])[1]


def test_a_ring_of_tiles_is_one_polygon_with_one_hole():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    mask[2, 2] = False
    [r] = _regions(mask)
    assert r.tiles == 8 and len(r.holes) == 1
    p = _poly(r)
    assert p.is_valid and p.area == 8 and Polygon(p.interiors[0]).area == 1
    assert p.equals(box(1, 1, 4, 4).difference(box(2, 2, 3, 3)))
    assert len(r.shell) == 5  # corners only: 4 and the closing point
    # RFC 7946: shell counter-clockwise, hole clockwise (in the numbers as written)
    assert Polygon(r.shell).exterior.is_ccw and not Polygon(r.holes[0]).exterior.is_ccw


def test_diagonal_only_contact_does_not_merge_but_a_hole_may_touch_its_outline():
    assert [r.tiles for r in _regions([[1, 0], [0, 1]])] == [1, 1]
    assert [r.tiles for r in _regions([[0, 1], [1, 0]])] == [1, 1]
    # one region (edge-connected) whose hole touches the outline at one corner: valid, hole kept
    [r] = _regions([[1, 1, 1], [1, 0, 1], [1, 1, 0]])
    assert r.tiles == 7 and len(r.holes) == 1 and _poly(r).is_valid and _poly(r).area == 7


def test_min_region_size_drops_small_regions_and_counts_the_rest():
    mask = np.zeros((6, 8), bool)
    mask[0:3, 0:3] = True  # 9 tiles
    mask[5, 5:7] = True  # 2 tiles
    mask[0, 6] = True  # 1 tile
    area = 0.04
    assert [r.tiles for r in _regions(mask, tile_area_mm2=area)] == [9, 2, 1]
    kept = _regions(mask, tile_area_mm2=area, min_area_mm2=0.08)
    assert [r.tiles for r in kept] == [9, 2]
    assert region_summary(kept) == (2, pytest.approx(9 * area))
    assert region_summary(_regions(mask, tile_area_mm2=area, min_area_mm2=1.0)) == (0, 0.0)


def test_measurements_match_the_tiles_inside_each_polygon():
    rng = np.random.default_rng(3)
    probs = rng.random((12, 14)).astype(np.float32)
    probs[np.isclose(probs, 0.5)] = 0.4
    mask = probs >= 0.5
    tile_px = 403.2  # a slide at 0.496 µm/px: 50 * 4.0 / 0.496 level-0 px per tile
    tile_mm2 = (50 * 4.0 / 1000) ** 2
    regions = _regions(mask, probs, tile_area_mm2=tile_mm2)
    feats = region_features("in", regions, tile_px)
    assert len(feats) == len(regions) > 3
    centres = [(Point((c + 0.5) * tile_px, (r + 0.5) * tile_px), probs[r, c]) for r, c in np.argwhere(mask)]
    um_per_px = 50 * 4.0 / tile_px
    for f in feats:
        poly = shape(f["geometry"])
        assert poly.is_valid
        inside = [p for pt, p in centres if poly.contains(pt)]
        m = f["properties"]["measurements"]
        assert m["Tile count"] == len(inside)
        assert m["Mean IDC probability"] == pytest.approx(float(np.mean(inside)), abs=1e-6)
        assert m["Max IDC probability"] == pytest.approx(float(np.max(inside)), abs=1e-6)
        assert m["Area mm^2"] == pytest.approx(len(inside) * tile_mm2, abs=1e-6)
        assert m["Area mm^2"] == pytest.approx(poly.area * um_per_px ** 2 / 1e6, rel=1e-6)  # from the polygon
        assert f["properties"]["objectType"] == "annotation" and f["properties"]["classification"]["name"] == "IDC"
    assert [f["properties"]["name"] for f in feats][:2] == ["IDC region 1", "IDC region 2"]
    assert [f["properties"]["measurements"]["Tile count"] for f in feats] == sorted(
        (f["properties"]["measurements"]["Tile count"] for f in feats), reverse=True)


def test_level0_coordinates_lie_on_the_tile_detections_for_a_non_integer_tile_size():
    tile_px = 403.2
    mask = np.zeros((3, 5), bool)
    mask[1, 2:4] = True
    coords = np.argwhere(np.ones(mask.shape, bool))
    probs = np.where(mask, 0.8, 0.2)[coords[:, 0], coords[:, 1]]
    [f] = region_features("in", find_regions(mask.shape, coords, probs, 0.5, tile_area_mm2=0.04), tile_px)
    ring = f["geometry"]["coordinates"][0]
    assert {tuple(p) for p in ring} == {(806.4, 403.2), (1612.8, 403.2), (1612.8, 806.4), (806.4, 806.4)}
    tiles = [shape(t["geometry"]) for t in idc_features("in", coords, probs, 0.5, tile_px)]
    assert shape(f["geometry"]).symmetric_difference(unary_union(tiles)).area < 1e-6
    mask[1, 3] = False  # a one-tile region is drawn exactly as its tile detection
    [f] = region_features("in", find_regions(mask.shape, coords, np.where(mask, 0.8, 0.2)[coords[:, 0], coords[:, 1]],
                                             0.5, tile_area_mm2=0.04), tile_px)
    assert f["geometry"]["coordinates"] == tile_polygon(1, 2, tile_px) == [[[806.4, 403.2], [1209.6, 403.2],
                                                                           [1209.6, 806.4], [806.4, 806.4],
                                                                           [806.4, 403.2]]]


def test_smoothing_is_off_by_default_and_rounds_outlines_when_asked():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 1:7] = True
    [exact] = _regions(mask)
    [smooth] = _regions(mask, smooth=2)
    assert _poly(exact).area == 24 and len(exact.shell) == 5
    assert _poly(smooth).is_valid and len(smooth.shell) > len(exact.shell)
    assert 0.8 * 24 < _poly(smooth).area < 24 and smooth.tiles == exact.tiles == 24


def _old_geojson(features: list[dict]) -> bytes:
    """What the report wrote before streaming: the whole collection built as one string."""
    body = ",\n".join(json.dumps(f, separators=(",", ":"), allow_nan=False) for f in features)
    return ('{"type":"FeatureCollection","features":[\n' + body + "\n]}\n").encode()


@pytest.mark.parametrize("n_tiles", [0, 1, 7])
def test_streamed_geojson_equals_the_old_whole_string_and_gzip_round_trips(tmp_path, n_tiles):
    rng = np.random.default_rng(n_tiles)
    coords = np.argwhere(np.ones((3, 4), bool))[:n_tiles]
    probs = np.linspace(0.55, 0.99, n_tiles).astype(np.float32)[rng.permutation(n_tiles)]
    want = _old_geojson(idc_features("x", coords, probs, 0.5, 50.0))
    path = write_geojson(tmp_path / "x.geojson", iter_idc_features("x", coords, probs, 0.5, 50.0), batch=3)
    assert path.read_bytes() == want  # several batches, one, or none: same bytes
    assert len(json.loads(want)["features"]) == n_tiles
    gz = write_geojson(tmp_path / "x.geojson.gz", iter_idc_features("x", coords, probs, 0.5, 50.0), gzip=True, batch=2)
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and gzip.decompress(gz.read_bytes()) == want
    again = write_geojson(tmp_path / "y.geojson.gz", iter_idc_features("x", coords, probs, 0.5, 50.0), gzip=True)
    assert again.read_bytes() == gz.read_bytes()  # no time or name in the gzip header
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failing_feature_stream_leaves_no_file(tmp_path):
    def feats():
        yield {"type": "Feature"}
        raise RuntimeError("worker lost")

    (tmp_path / "x.geojson").write_text("old")
    with pytest.raises(RuntimeError):
        write_geojson(tmp_path / "x.geojson", feats(), batch=1)
    assert (tmp_path / "x.geojson").read_text() == "old" and not list(tmp_path.glob(".tmp-*"))


def _reference_feature(input_id: str, row: int, col: int, p: float, tile_px: float) -> dict:
    """A tile's feature as the format says, built independently: uuid5 id, ring of level-0 corners, measurements."""
    import uuid

    def num(v):
        r = round(float(v), 3)
        return int(r) if r.is_integer() else r

    x0, y0, x1, y1 = (num(v) for v in (col * tile_px, row * tile_px, (col + 1) * tile_px, (row + 1) * tile_px))
    return {"type": "Feature", "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"cancernet-batch:{input_id}/{row}/{col}")),
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "detection", "classification": {"name": "IDC", "color": [220, 20, 60]},
                           "measurements": {"IDC probability": round(float(p), 6), "Tile row": row, "Tile col": col}}}


@pytest.mark.parametrize("tile_px", [50.0, 403.2, 199.6, 1 / 3, 1e6 + 0.25])
def test_feature_lines_are_json_dumps_of_the_reference_features(tile_px):
    """The report's tile GeoJSON lines are made as text directly: each is exactly json.dumps (compact) of the feature
    built the plain way, for odd tile sizes, tiny and huge probabilities and ids with any characters."""
    from cancernet_batch.geojson import idc_feature_lines

    rng = np.random.default_rng(int(tile_px * 7) % 1000)
    coords = rng.integers(-1, 3000, (400, 2))
    probs = rng.random(400).astype(np.float32)
    probs[:5] = [1.0, 0.5, np.float32(1e-7), np.nan, np.float32(0.9999999)]
    for input_id in ("x", "slide é/ü 名前", "a" * 300):
        lines = list(idc_feature_lines(input_id, coords, probs, 0.0, tile_px))
        keep = [i for i in np.lexsort((coords[:, 1], coords[:, 0]))
                if np.isfinite(probs[i]) and coords[i, 0] >= 0 and coords[i, 1] >= 0]
        want = [json.dumps(_reference_feature(input_id, int(coords[i, 0]), int(coords[i, 1]), probs[i], tile_px),
                           separators=(",", ":"), allow_nan=False) for i in keep]
        assert len(lines) == len(want) > 300 and lines == want
