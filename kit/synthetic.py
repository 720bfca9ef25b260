"""A synthetic dataset in the competition's layout: the kit's embedded default data.

Real HuBMAP slides cannot be reached from the build machines, so the demo, the notebooks and the
tests run on generated slides that imitate them closely enough to exercise the whole pipeline:
white-ish glass around an irregular tissue section (about half of the slide), pink PAS-stained
cortex and medulla with tubules and nuclei, glomeruli (dense purple-magenta lobulated tufts inside
a thin pale Bowman's space and capsule, 70-160 px across) and look-alikes that are *not* glomeruli
(vessels with a pale lumen, round clusters of tubules, dark cell-rich blobs without the pale ring).
Stain colours vary a little per patient and per slide.

Colours follow Beer-Lambert: each pixel holds an amount of PAS (magenta) and of haematoxylin
(blue-purple), and ``rgb = glass * exp(-(pas * OD_pas + haem * OD_haem))``.

    python -m kit synth --out data/synthetic      # make_dataset with the defaults below
    python -m kit synth --out data/realistic --profile realistic

Two profiles (`Profile`, `PROFILES`): ``mini`` (the default: small slides, glomeruli 70-160 px,
for the tests, the demo and the notebooks) and ``realistic`` (the competition's pixel scale: a
~5.5k x 6k px window of tissue, glomeruli 200-400 px across, stain that differs by patient and
drifts within a slide, look-alikes that share the glomeruli's cues, sclerotic glomeruli and ones
whose Bowman's space has collapsed, glomeruli cut by the tissue edge, out-of-focus patches, a
tissue fold, pen marks and dust). The mini profile's output is byte-identical to the generator
before profiles existed (a test pins it), so cached datasets stay valid.

Layout written (as on Kaggle): ``train.csv`` (id,encoding), ``train/{id}.tiff``,
``train/{id}.json`` (glomerulus polygons), ``train/{id}-anatomical-structure.json`` (Cortex /
Medulla), ``test/{id}.tiff`` (+ its anatomical-structure json), ``sample_submission.csv``
(id,predicted) and ``HuBMAP-20-dataset_information.csv``; plus a hidden ``.synthetic.json``
manifest (parameters, version), written last.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from kit import atomic
from kit.polygons import rasterize
from kit.rle import encode

__all__ = [
    "DEFAULT_PARAMS",
    "DEFAULT_SIZE",
    "PROFILES",
    "Profile",
    "Stain",
    "SyntheticSlide",
    "default_dataset",
    "is_complete",
    "make_dataset",
    "make_slide",
]

# Bump when the generated images or files change, so cached default datasets are rebuilt.
# 3: polygons filled by kit.polygons.rasterize (pixel centres inside), in the images and the masks.
DATASET_VERSION = "3"
# Deliberately not a multiple of 256 / 512 / 1024: tiling code must handle ragged edges.
DEFAULT_SIZE = (2311, 2897)
# The embedded default (see default_dataset): 8 slides (6 train + 2 test) from 5 patients.
DEFAULT_PARAMS = {"slides": 8, "test_slides": 2, "size": DEFAULT_SIZE, "seed": 0, "patients": 5}
CACHE_ENV = "HUBMAP_KIT_CACHE"
MANIFEST_NAME = ".synthetic.json"
MIN_SIDE = 256

INFO_COLUMNS = (
    "image_file",
    "width_pixels",
    "height_pixels",
    "anatomical_structures_segmention_file",  # sic: the competition's spelling
    "glomerulus_segmentation_file",
    "patient_number",
    "race",
    "ethnicity",
    "sex",
    "age",
    "weight_kilograms",
    "height_centimeters",
    "bmi_kg/m^2",
    "laterality",
    "percent_cortex",
    "percent_medulla",
)


@dataclass(frozen=True)
class Profile:
    """What sets a synthetic slide's scale and difficulty (lengths in full-resolution px).

    ``MINI``'s values are the generator's historical constants; the zero / empty defaults of the
    difficulty fields switch their features off (and draw nothing from the random stream).
    """

    name: str
    size: tuple[int, int]  # (H, W) of every slide
    glomerulus_diameter: tuple[float, float]  # range of a glomerulus's largest diameter
    glomeruli_per_mpx: tuple[float, float]  # glomeruli per million px of cortex
    tubule_spacing: tuple[int, int]  # grid step of the tubule cross-sections
    detail: float = 1.0  # scale of the fine structure (capsule, Bowman's space, vessel walls)
    tissue_fraction: tuple[float, float] = (0.47, 0.57)  # share of the slide that is tissue
    medulla_fraction: tuple[float, float] = (0.15, 0.35)  # share of the tissue that is medulla
    lookalikes: tuple[float, float] = (0.5, 0.8)  # look-alikes per glomerulus
    sclerotic: float = 0.1  # share of glomeruli that are scarred (pale, homogeneous; labelled)
    collapsed: float = 0.0  # share of glomeruli whose Bowman's space has collapsed
    ringed_clusters: bool = False  # tubule clusters get a capsule-like pale ring
    edge_cut: float = 0.0  # glomeruli cut by the tissue edge, per glomerulus inside
    patient_stain: float = 0.12  # log-sd of a patient's stain densities (hue, saturation)
    patient_light: float = 0.0  # sd of a patient's brightness (multiplies the optical density)
    slide_stain: float = 0.03  # log-sd of a slide's stain around its patient's
    stain_drift: float = 0.0  # amplitude of the smooth colour drift within a slide
    softness: float = 0.8  # optics blur (Gaussian sigma): boundaries get softer
    out_of_focus: tuple[int, int] = (0, 0)  # range of the number of blurred patches
    folds: tuple[int, int] = (0, 0)  # range of the number of tissue folds (doubled tissue)
    pen_marks: tuple[int, int] = (0, 0)  # range of the number of ink strokes on the glass
    dust: tuple[int, int] = (3, 12)  # range of the number of dust specks
    dust_radius: tuple[int, int] = (1, 5)

    @property
    def glomerulus_radius(self) -> tuple[float, float]:
        """Range of a glomerulus's largest radius (half of ``glomerulus_diameter``)."""
        return (self.glomerulus_diameter[0] / 2, self.glomerulus_diameter[1] / 2)


MINI = Profile("mini", DEFAULT_SIZE, (70, 160), (11, 18), (30, 38))
# Real scale (0.5 um/px): glomeruli 200-400 px across in a window of tissue cut from a slide.
# Sizes are deliberately awkward; ~33 Mpx a slide keeps 8 slides to a few minutes on 2 cores.
REALISTIC = Profile(
    "realistic",
    size=(5437, 6089),
    glomerulus_diameter=(240, 420),  # largest diameter; the equal-area one is ~0.85 of it
    glomeruli_per_mpx=(1.6, 2.6),
    tubule_spacing=(80, 100),
    detail=2.5,
    tissue_fraction=(0.72, 0.85),
    medulla_fraction=(0.25, 0.4),
    lookalikes=(1.5, 2.0),
    sclerotic=0.25,
    collapsed=0.4,
    ringed_clusters=True,
    edge_cut=0.1,
    patient_stain=0.35,
    patient_light=0.2,
    slide_stain=0.06,
    stain_drift=0.15,
    softness=2.0,
    out_of_focus=(1, 4),
    folds=(0, 2),
    pen_marks=(0, 3),
    dust=(10, 40),
    dust_radius=(2, 14),
)
PROFILES = {p.name: p for p in (MINI, REALISTIC)}


def _profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[profile]


# QuPath-style class colours (packed ARGB ints) for the json "classification"; illustrative.
_CLASS_COLOURS = {"glomerulus": -3140401, "Cortex": -16711936, "Medulla": -16776961}


@dataclass(frozen=True)
class Stain:
    """A slide's staining: optical density per unit of each stain (RGB) and the glass colour."""

    pas: tuple[float, float, float] = (0.23, 1.39, 0.41)  # magenta
    haematoxylin: tuple[float, float, float] = (0.98, 1.23, 0.47)  # blue-purple
    glass: tuple[float, float, float] = (241.0, 239.0, 243.0)

    def jitter(self, rng: np.random.Generator, spread: float) -> Stain:
        """A variant of this stain: each density scaled by about ``exp(N(0, spread))``."""

        def vary(od):
            gain = math.exp(rng.normal(0, spread))  # stain intensity
            return tuple(float(v * gain * math.exp(rng.normal(0, spread / 2))) for v in od)

        light = rng.normal(0, 20 * spread)  # brightness; channels stay close: glass is grey
        glass = tuple(
            float(np.clip(g + light + rng.normal(0, 10 * spread), 222, 250)) for g in self.glass
        )
        return Stain(vary(self.pas), vary(self.haematoxylin), glass)


@dataclass
class SyntheticSlide:
    """One generated slide with its annotations (polygon vertices are (x = column, y = row))."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    glomeruli: list[np.ndarray]  # int32 (n, 2) open rings, one per glomerulus
    cortex: list[list[np.ndarray]]  # polygons, each [outer ring, hole rings...], int32 (n, 2)
    medulla: list[list[np.ndarray]]
    distractors: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (kind, ring)

    @property
    def mask(self) -> np.ndarray:
        """uint8 (H, W) 0/1: the glomeruli polygons rasterised (what train.csv encodes)."""
        return rasterize([[ring] for ring in self.glomeruli], self.image.shape[:2])

    def region_fraction(self, name: str) -> float:
        """Fraction of the slide covered by ``"Cortex"``, ``"Medulla"`` or ``"tissue"``."""
        polygons = {"Cortex": self.cortex, "Medulla": self.medulla}
        polygons["tissue"] = self.cortex + self.medulla
        return float(rasterize(polygons[name], self.image.shape[:2]).mean())


# ----------------------------------------------------------------------------------------------
# Rendering (pure: everything comes from the rng)


def _noise(shape: tuple[int, int], cell: float, rng: np.random.Generator, smooth=True):
    """Smooth value noise, float32 (H, W), roughly zero-mean unit-variance, blobs ~``cell`` px.

    ``smooth=False`` interpolates linearly: 3x faster, fine for faint full-size texture.
    """
    h, w = shape
    cell = max(float(cell), 1.0)
    gh, gw = int(h / cell) + 4, int(w / cell) + 4
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    size = (max(int(gw * cell), w + 1), max(int(gh * cell), h + 1))
    big = cv2.resize(grid, size, interpolation=cv2.INTER_CUBIC if smooth else cv2.INTER_LINEAR)
    # interpolation of white noise keeps ~0.6 (cubic) or ~0.5 (linear) of its spread
    return big[:h, :w] * np.float32(1.6 if smooth else 2.0)


def _regions(shape, rng, tissue_fraction, medulla_fraction, f=8):
    """Tissue and medulla masks (bool (H, W)) plus their 1/f-scale versions for placement."""
    h, w = shape
    lh, lw = -(-h // f), -(-w // f)
    y = np.linspace(-1, 1, lh, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, lw, dtype=np.float32)[None, :]
    # An off-centre rotated ellipse gives the section its overall shape, noise makes it irregular
    # and a penalty near the border keeps most of it on the glass.
    a = rng.uniform(-0.6, 0.6)
    cy, cx = rng.uniform(-0.12, 0.12, 2)
    u = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
    v = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
    ru, rv = rng.uniform(0.75, 1.0), rng.uniform(0.5, 0.8)
    field = 1 - (u / ru) ** 2 - (v / rv) ** 2
    field += 0.45 * _noise((lh, lw), max(lh, lw) / 3.5, rng)
    field += 0.12 * _noise((lh, lw), max(lh, lw) / 14, rng)
    edge = np.minimum(np.minimum(1 - np.abs(x), 1 - np.abs(y)), 0.08)
    field -= 25 * (0.08 - edge) ** 1.2
    threshold = np.quantile(field, 1 - tissue_fraction)
    tissue_low = field > threshold
    # Medulla: the deep part of the section (kidney cortex lies under the capsule).
    depth = cv2.distanceTransform(tissue_low.astype(np.uint8), cv2.DIST_L2, 5)
    depth = depth / max(float(depth.max()), 1.0) + 0.2 * _noise((lh, lw), max(lh, lw) / 6, rng)
    med_threshold = np.quantile(depth[tissue_low], 1 - medulla_fraction)
    medulla_low = tissue_low & (depth > med_threshold)

    tissue = cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR) > threshold
    medulla = cv2.resize(depth, (w, h), interpolation=cv2.INTER_LINEAR) > med_threshold
    medulla &= tissue
    return tissue, medulla, tissue_low, medulla_low


def _contours(mask: np.ndarray, min_area: float = 64.0) -> list[list[np.ndarray]]:
    """Polygons with holes ([outer, holes...], int32 (n, 2) x/y rings) tracing a bool mask."""
    found, hierarchy = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE
    )
    if hierarchy is None:
        return []
    rings = [cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2).astype(np.int32) for c in found]
    polygons = []
    for i, (_, _, child, parent) in enumerate(hierarchy[0]):
        if parent != -1 or cv2.contourArea(rings[i]) < min_area or len(rings[i]) < 3:
            continue
        holes = []
        while child != -1:
            if cv2.contourArea(rings[child]) >= min_area and len(rings[child]) >= 3:
                holes.append(rings[child])
            child = hierarchy[0][child][0]
        polygons.append([rings[i], *holes])
    return polygons


def _blob(rng, radius, aspect=1.2, wobble=0.04, n=64):
    """Vertex offsets (float (n, 2), x/y) of a star-shaped blob: an ellipse with a wavy edge,
    ``radius`` px from the centre at its farthest."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    stretch = rng.uniform(1.0, aspect)
    angle = rng.uniform(0, np.pi)
    r = np.ones(n)
    for m in range(2, 6):
        r += rng.normal(0, wobble) * np.cos(m * theta + rng.uniform(0, 2 * np.pi))
    x, y = r * np.cos(theta), r * np.sin(theta) / stretch
    x, y = x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)
    pts = np.stack([x, y], 1)
    return pts * (radius / _extent(pts))


def _extent(offsets: np.ndarray) -> float:
    """The largest distance of a ring's vertices from its centre."""
    return float(np.hypot(offsets[:, 0], offsets[:, 1]).max())


def _shrink(offsets: np.ndarray, by: float) -> np.ndarray:
    """Move each vertex of a star-shaped ring ``by`` pixels towards the centre."""
    length = np.hypot(offsets[:, 0], offsets[:, 1])[:, None]
    return offsets * np.clip(1 - by / np.maximum(length, 1e-6), 0.05, None)


def _ring(centre, offsets) -> np.ndarray:
    return np.round(np.asarray(centre, float) + offsets).astype(np.int32)


def _fill(shape, ring):
    """bool (H, W): the ring filled as the labels are (so a drawn glomerulus is its mask)."""
    return rasterize([[ring]], shape).astype(bool)


def _points_in(mask: np.ndarray, count: int, rng) -> np.ndarray:
    """``count`` random (x, y) integer points inside a bool mask (fewer if it is empty)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0 or count <= 0:
        return np.zeros((0, 2), np.int64)
    pick = rng.integers(0, len(ys), count)
    return np.stack([xs[pick], ys[pick]], 1)


class _Canvas:
    """Stain amounts being painted (float32 (H, W) PAS and haematoxylin) plus nuclei seeds."""

    def __init__(self, shape):
        self.pas = np.zeros(shape, np.float32)
        self.haem = np.zeros(shape, np.float32)
        self.occupied = np.zeros(shape, bool)  # footprints of objects: no tissue nuclei there
        self.nuclei: list[np.ndarray] = []  # (n, 3) float: x, y, size weight

    def patch(self, centre, radius):
        """Slices of a square patch around ``centre`` and the patch's (x0, y0) origin."""
        h, w = self.pas.shape
        r = int(math.ceil(radius)) + 4
        x0, y0 = max(int(centre[0]) - r, 0), max(int(centre[1]) - r, 0)
        x1, y1 = min(int(centre[0]) + r + 1, w), min(int(centre[1]) + r + 1, h)
        return (slice(y0, y1), slice(x0, x1)), np.array([x0, y0])

    def add_nuclei(self, points, origin, rng, weight=(0.9, 1.5)):
        if len(points):
            pts = np.asarray(points, np.float64) + origin
            weights = rng.uniform(*weight, len(pts))[:, None]
            self.nuclei.append(np.hstack([pts, weights]))


def _draw_tubules(canvas, tissue, medulla, rng, spacing):
    """Tubule cross-sections everywhere in the tissue: pink epithelium around a pale lumen."""
    h, w = tissue.shape
    gy, gx = np.mgrid[0 : h + spacing : spacing, 0 : w + spacing : spacing]
    jitter = rng.uniform(-0.4 * spacing, 0.4 * spacing, (2, *gy.shape))
    cy = np.clip(gy + jitter[0], 0, h - 1).astype(int).ravel()
    cx = np.clip(gx + jitter[1], 0, w - 1).astype(int).ravel()
    near = tissue[cy, cx] | tissue[np.clip(cy + spacing // 2, 0, h - 1), cx]
    cy, cx = cy[near], cx[near]
    n = len(cy)
    in_med = medulla[cy, cx]
    # cortex: convoluted tubules cut across (round-oval); medulla: straight tubules (elongated)
    med_angle = rng.uniform(0, 180)
    a = np.where(in_med, rng.uniform(0.7, 1.1, n) * spacing, rng.uniform(0.5, 0.68, n) * spacing)
    b = np.where(in_med, rng.uniform(0.25, 0.35, n) * spacing, a * rng.uniform(0.65, 1.0, n))
    angle = np.where(in_med, med_angle + rng.normal(0, 8, n), rng.uniform(0, 180, n))
    lumen = rng.uniform(0.3, 0.6, n)
    epithelium = rng.uniform(0.42, 0.6, n)
    brush = rng.random(n) < 0.6  # proximal tubules: PAS-bright brush border
    pas = canvas.pas
    for i in rng.permutation(n):
        c = (int(cx[i]), int(cy[i]))
        axes = (int(a[i]), int(b[i]))
        inner = (max(int(a[i] * lumen[i]), 1), max(int(b[i] * lumen[i]), 1))
        ang = float(angle[i])
        cv2.ellipse(pas, c, axes, ang, 0, 360, float(epithelium[i]), -1)
        cv2.ellipse(pas, c, axes, ang, 0, 360, 0.75, 1)  # basement membrane
        if brush[i]:
            cv2.ellipse(pas, c, inner, ang, 0, 360, 0.85, 2)
        cv2.ellipse(pas, c, (max(inner[0] - 1, 1), max(inner[1] - 1, 1)), ang, 0, 360, 0.07, -1)


def _lobules(shape, tuft, centre, radius, rng, base, spread):
    """PAS amounts inside a tuft: overlapping lobules with pale seams and capillary lumens."""
    t = np.full(shape, base, np.float32)
    for _ in range(int(rng.integers(5, 10))):
        off = rng.normal(0, 0.35 * radius, 2)
        c = (int(centre[0] + off[0]), int(centre[1] + off[1]))
        r = int(rng.uniform(0.3, 0.5) * radius) + 2
        cv2.circle(t, c, r, float(base + rng.uniform(-spread, spread)), -1)
        cv2.circle(t, c, r, float(base * 0.55), 1)
    for x, y in _points_in(tuft, int(tuft.sum() / 160), rng):
        cv2.circle(t, (int(x), int(y)), int(rng.integers(1, 4)), 0.12, -1)
    return t


def _stamp(canvas, centre, offsets):
    """The canvas patch around one round structure, ready to draw into.

    Returns ``radius, sl, origin, local, pas, haem, outer``: the structure's extent, the patch's
    slices and origin, the centre in patch coordinates, copies of the two stain planes of the
    patch, and the structure's filled outline (bool).
    """
    radius = _extent(offsets)
    sl, origin = canvas.patch(centre, radius)
    local = np.asarray(centre, float) - origin
    pas, haem = canvas.pas[sl].copy(), canvas.haem[sl].copy()
    outer = _fill(pas.shape, _ring(local, offsets))
    return radius, sl, origin, local, pas, haem, outer


def _draw_glomerulus(canvas, centre, offsets, rng, p: Profile = MINI):
    """A glomerulus: capsule line, pale Bowman's space and a lobulated purple tuft."""
    radius, sl, origin, local, pas, haem, outer = _stamp(canvas, centre, offsets)
    shape = pas.shape
    capsule = rng.uniform(1.5, 3.0) * p.detail
    space = rng.uniform(4.0, 11.0) * p.detail
    if p.collapsed and rng.random() < p.collapsed:
        space = rng.uniform(0.5, 1.5)  # the tuft fills the capsule: no pale ring to see
    inside = _fill(shape, _ring(local, _shrink(offsets, capsule)))
    shift = rng.normal(0, 0.3 * space, 2).clip(-0.6 * space, 0.6 * space)
    tuft_ring = _ring(local + shift, _shrink(offsets, capsule + space))
    tuft = _fill(shape, tuft_ring) & inside
    pas[outer] = rng.uniform(0.7, 0.9)
    pas[inside] = 0.05 + 0.02 * rng.random(int(inside.sum()), dtype=np.float32)
    haem[outer] = 0.0
    sclerotic = rng.random() < p.sclerotic
    if sclerotic:  # scarred: glassy, few cells, still inside its capsule
        t = np.full(shape, rng.uniform(0.85, 1.0), np.float32)
        n_nuclei = int(tuft.sum() / (300 * p.detail))
    else:
        t = _lobules(shape, tuft, local + shift, radius - capsule - space, rng, 0.7, 0.1)
        n_nuclei = int(tuft.sum() / (rng.uniform(70, 110) * p.detail))
    pas[tuft] = t[tuft]
    haem[tuft] = rng.uniform(0.12, 0.25)
    _commit(canvas, sl, outer, pas, haem)
    canvas.add_nuclei(_points_in(tuft, n_nuclei, rng), origin, rng)
    # flat parietal cells lining the capsule
    rim = inside & ~_fill(shape, _ring(local, _shrink(offsets, capsule + 2)))
    canvas.add_nuclei(_points_in(rim, int(radius / 8), rng), origin, rng, (0.7, 1.0))


def _draw_vessel(canvas, centre, offsets, rng, p: Profile = MINI):
    """An arteriole cut across: a thick layered pink wall around a pale lumen (no tuft)."""
    radius, sl, origin, local, pas, haem, outer = _stamp(canvas, centre, offsets)
    shape = pas.shape
    wall = rng.uniform(0.3, 0.5) * radius
    lumen_ring = _ring(local + rng.normal(0, 0.08 * wall, 2), _shrink(offsets, wall))
    lumen = _fill(shape, lumen_ring) & outer
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    rr = np.hypot(xx - local[0], yy - local[1]).astype(np.float32)
    layers = 0.5 + 0.12 * np.sin(rr * (2 * np.pi / (rng.uniform(4, 7) * p.detail)))
    pas[outer] = layers[outer]
    haem[outer] = 0.08
    cv2.polylines(pas, [_ring(local, offsets).reshape(-1, 1, 2)], True, 0.75, 2)
    pas[lumen] = 0.03
    haem[lumen] = 0.0
    cv2.polylines(pas, [lumen_ring.reshape(-1, 1, 2)], True, 0.95, 2)  # elastic lamina
    for x, y in _points_in(lumen, int(rng.integers(0, 8)), rng):  # red cells
        cv2.circle(pas, (int(x), int(y)), 3, 0.35, -1)
    muscle = outer & ~lumen
    for x, y in _points_in(muscle, int(muscle.sum() / 110), rng):
        tangent = math.degrees(math.atan2(y - local[1], x - local[0])) + 90
        cv2.ellipse(haem, (int(x), int(y)), (4, 1), tangent, 0, 360, 1.3, -1)
    _commit(canvas, sl, outer, pas, haem)


def _draw_tubule_cluster(canvas, centre, offsets, rng, p: Profile = MINI):
    """A round nest of small tubules inside a thin outline: round and pink, but no tuft
    (with ``p.ringed_clusters``, inside a pale ring like a Bowman's space)."""
    radius, sl, origin, local, pas, haem, outer = _stamp(canvas, centre, offsets)
    shape = pas.shape
    t = np.full(shape, 0.38, np.float32)
    step = rng.uniform(16, 24) * p.detail
    for gy in np.arange(0, shape[0], step):
        for gx in np.arange(0, shape[1], step):
            c = (int(gx + rng.uniform(-3, 3)), int(gy + rng.uniform(-3, 3)))
            r = int(step * rng.uniform(0.45, 0.6))
            cv2.circle(t, c, r, float(rng.uniform(0.5, 0.65)), -1)
            cv2.circle(t, c, max(r // 2, 2), 0.9, 2)
            cv2.circle(t, c, max(r // 2 - 1, 1), 0.08, -1)
    pas[outer] = t[outer]
    haem[outer] = 0.1
    cv2.polylines(pas, [_ring(local, offsets).reshape(-1, 1, 2)], True, 0.8, 2)
    if p.ringed_clusters:
        gap = rng.uniform(4.0, 11.0) * p.detail
        inner = _ring(local, _shrink(offsets, 2 + gap / 2)).reshape(-1, 1, 2)
        cv2.polylines(pas, [inner], True, 0.05, max(int(gap), 1))
    _commit(canvas, sl, outer, pas, haem)
    cells = outer & (t > 0.3)
    canvas.add_nuclei(_points_in(cells, int(cells.sum() / 220), rng), origin, rng)


def _draw_dark_blob(canvas, centre, offsets, rng, p: Profile = MINI):
    """A cell-rich purple blob (infiltrate) like a tuft but with no Bowman's space or capsule."""
    radius, sl, origin, local, pas, haem, outer = _stamp(canvas, centre, offsets)
    shape = pas.shape
    t = _lobules(shape, outer, local, radius, rng, 0.5, 0.12)
    pas[outer] = t[outer]
    haem[outer] = rng.uniform(0.35, 0.55)
    _commit(canvas, sl, outer, pas, haem)
    canvas.add_nuclei(
        _points_in(outer, int(outer.sum() / (rng.uniform(28, 45) * p.detail)), rng), origin, rng
    )


def _commit(canvas, sl, footprint, pas, haem):
    canvas.pas[sl][footprint] = pas[footprint]
    canvas.haem[sl][footprint] = haem[footprint]
    canvas.occupied[sl] |= footprint


def _place(rng, allowed_low, f, radii, taken, gap=8.0, tries=40):
    """(x, y, r) for objects of the given radii inside ``allowed_low`` (a 1/f-scale mask), each
    fully inside it and clear of the circles in ``taken`` (a list of (x, y, r), extended).
    Objects that find no room are dropped."""
    depth = cv2.distanceTransform(allowed_low.astype(np.uint8), cv2.DIST_L2, 5) * f - f
    placed: list[tuple[float, float, float]] = []
    if len(radii) == 0:
        return placed
    ys, xs = np.nonzero(depth > radii.min() + gap)
    if len(ys) == 0:
        return placed
    for r in radii:
        for _ in range(tries):
            i = rng.integers(len(ys))
            y, x = ys[i], xs[i]
            if depth[y, x] < r + gap:
                continue
            cx, cy = (x + rng.random()) * f, (y + rng.random()) * f
            if all((cx - tx) ** 2 + (cy - ty) ** 2 > (r + tr + gap) ** 2 for tx, ty, tr in taken):
                taken.append((cx, cy, r))
                placed.append((cx, cy, r))
                break
    return placed


def _splat_nuclei(canvas, rng, tissue, density, sigma=1.8):
    """Turn the nuclei seeds (objects' + random ones in the tissue) into crisp dark dots."""
    h, w = tissue.shape
    n = int(tissue.sum() / density)
    pts = np.stack([rng.integers(0, w, n), rng.integers(0, h, n)], 1)
    keep = tissue[pts[:, 1], pts[:, 0]] & ~canvas.occupied[pts[:, 1], pts[:, 0]]
    keep &= canvas.pas[pts[:, 1], pts[:, 0]] > 0.2  # not in a lumen
    seeds = [np.hstack([pts[keep], rng.uniform(0.8, 1.4, (int(keep.sum()), 1))]), *canvas.nuclei]
    seeds = np.vstack(seeds)
    img = np.zeros((h, w), np.float32)
    x = np.clip(seeds[:, 0].astype(int), 0, w - 1)
    y = np.clip(seeds[:, 1].astype(int), 0, h - 1)
    np.add.at(img, (y, x), seeds[:, 2].astype(np.float32))
    img = cv2.GaussianBlur(img, (0, 0), sigma) * np.float32(2 * np.pi * sigma**2)
    # a soft threshold turns gaussian bumps into dots with sharp-ish edges, bigger for bigger seeds
    return np.clip((img - 0.35) * 4, 0, 1)


def make_slide(
    size: tuple[int, int] | None = None,
    seed: int | np.random.Generator = 0,
    stain: Stain | None = None,
    profile: str | Profile = "mini",
) -> SyntheticSlide:
    """Generate one slide (image + glomerulus polygons + cortex / medulla) from a seed.

    Args:
        size: (H, W) in pixels, each at least 256; default the profile's.
        seed: an int or a numpy Generator (consumed).
        stain: colours; default ``Stain()`` (the kit's reference PAS colours).
        profile: ``"mini"``, ``"realistic"`` or a `Profile`: scale and difficulty.
    """
    p = _profile(profile)
    h, w = _check_size(size or p.size)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    stain = stain or Stain()
    f = 8
    tissue, medulla, tissue_low, medulla_low = _regions(
        (h, w), rng, rng.uniform(*p.tissue_fraction), rng.uniform(*p.medulla_fraction), f
    )

    canvas = _Canvas((h, w))
    canvas.pas[tissue] = 0.3  # interstitium
    _draw_tubules(canvas, tissue, medulla, rng, spacing=int(rng.integers(*p.tubule_spacing)))

    # Glomeruli live in the cortex; look-alikes anywhere in the tissue. Nothing overlaps.
    taken: list[tuple[float, float, float]] = []
    full, low = (tissue, medulla), (tissue_low, medulla_low)
    rings = _draw_glomeruli(canvas, rng, p, full, low, taken, f)
    distractors = _draw_lookalikes(canvas, rng, p, tissue_low, len(rings), taken, f)

    image = _compose(canvas, tissue, stain, rng, p)
    return SyntheticSlide(
        image=image,
        glomeruli=rings,
        cortex=_contours(tissue & ~medulla),
        medulla=_contours(medulla),
        distractors=distractors,
    )


def _draw_glomeruli(canvas, rng, p, full, low, taken, f=8) -> list[np.ndarray]:
    """The glomeruli, placed in the cortex (``low``: 1/f-scale tissue and medulla masks) and,
    per the profile, cut by the tissue edge: drawn on ``canvas``, their rings returned and their
    circles added to ``taken``."""
    tissue_low, medulla_low = low
    cortex_low = tissue_low & ~medulla_low
    cortex_area = float(cortex_low.sum()) * f * f
    n_glom = int(round(cortex_area / 1e6 * rng.uniform(*p.glomeruli_per_mpx)))
    rings = []
    for cx, cy, r in _place(rng, cortex_low, f, rng.uniform(*p.glomerulus_radius, n_glom), taken):
        offsets = _blob(rng, r, aspect=1.35, wobble=0.02)
        _draw_glomerulus(canvas, (cx, cy), offsets, rng, p)
        rings.append(_ring((cx, cy), offsets))
    if p.edge_cut:
        n_cut = int(round(len(rings) * p.edge_cut))
        rings += _edge_glomeruli(canvas, rng, p, full, low, n_cut, taken, f)
    return rings


def _draw_lookalikes(canvas, rng, p, tissue_low, n_glomeruli, taken, f=8):
    """Look-alikes of glomeruli (vessels, tubule clusters, dark blobs) anywhere in the tissue,
    the profile's share of ``n_glomeruli`` (at least one): drawn on ``canvas`` clear of
    ``taken``; returns (kind, ring) per look-alike."""
    distractors = []
    n_other = max(1, int(round(n_glomeruli * rng.uniform(*p.lookalikes))))
    kinds = rng.choice(["vessel", "tubules", "blob"], n_other, p=[0.4, 0.3, 0.3])
    draw = {"vessel": _draw_vessel, "tubules": _draw_tubule_cluster, "blob": _draw_dark_blob}
    placed = _place(rng, tissue_low, f, rng.uniform(*p.glomerulus_radius, n_other), taken)
    for kind, (cx, cy, r) in zip(kinds, placed, strict=False):
        wobble = 0.05 if kind == "blob" else 0.02
        offsets = _blob(rng, r, aspect=1.35, wobble=wobble)
        draw[str(kind)](canvas, (cx, cy), offsets, rng, p)
        distractors.append((str(kind), _ring((cx, cy), offsets)))
    return distractors


def _compose(canvas, tissue, stain, rng, p: Profile = MINI):
    """Stain amounts -> uint8 RGB: texture, counterstain, nuclei, optics blur, Beer-Lambert,
    then the profile's artefacts (folds, colour drift, defocus, ink, dust)."""
    h, w = tissue.shape
    d = p.detail
    nuclei = _splat_nuclei(canvas, rng, tissue, density=240.0 * d, sigma=1.8 * math.sqrt(d))
    texture = (
        1 + 0.16 * _noise((h, w), 3 * d, rng, False) + 0.12 * _noise((h, w), 14 * d, rng, False)
    )
    pas = canvas.pas * texture
    pas *= tissue
    haem = canvas.haem + np.float32(0.1) * tissue + np.float32(1.5) * nuclei
    if p.edge_cut:
        haem *= tissue  # glomeruli cut by the edge: nothing of them on the glass
    if p.folds[1]:
        fold = 1 + _folds(tissue, rng, p.folds)  # tissue lying on itself: twice the stain
        pas *= fold
        haem *= fold
    if p.stain_drift:
        for plane in (pas, haem):  # each stain drifts on its own: the hue drifts too
            plane *= np.exp(p.stain_drift * _noise((h, w), max(h, w) / 2, rng, False))
    pas = cv2.GaussianBlur(pas, (0, 0), p.softness)
    haem = cv2.GaussianBlur(haem, (0, 0), p.softness)
    light = 1 + 0.02 * _noise((h, w), max(h, w) / 3, rng, False)  # uneven illumination
    grain = rng.standard_normal((h, w), dtype=np.float32) * np.float32(2.0)  # sensor noise
    image = np.empty((h, w, 3), np.uint8)
    for k in range(3):
        od = pas * np.float32(stain.pas[k]) + haem * np.float32(stain.haematoxylin[k])
        channel = np.exp(-od) * light * np.float32(stain.glass[k]) + grain + np.float32(0.5)
        image[..., k] = np.clip(channel, 0, 255)
    if p.out_of_focus[1]:
        _defocus(image, rng, p.out_of_focus)
    if p.pen_marks[1]:
        _ink(image, rng, p.pen_marks)
    # dust on the glass: grey specks (no colour, so no saturation)
    for _ in range(int(rng.integers(*p.dust))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        grey = int(rng.uniform(120, 200))
        radius = int(rng.integers(*p.dust_radius))
        cv2.circle(image, (x, y), radius, (grey, grey, grey), -1, cv2.LINE_AA)
    return image


def _edge_glomeruli(canvas, rng, p, full, low, n, taken, f=8):
    """Up to ``n`` glomeruli centred at the tissue edge in the cortex: drawn whole (the glass
    part is erased later), labelled only where there is tissue. Returns their rings."""
    tissue, medulla = full
    tissue_low, medulla_low = low
    edge = cv2.distanceTransform(tissue_low.astype(np.uint8), cv2.DIST_L2, 5)
    from_medulla = cv2.distanceTransform((~medulla_low).astype(np.uint8), cv2.DIST_L2, 5) * f
    rings = []
    for x, y in _points_in((edge > 0) & (edge <= 3) & ~medulla_low, 4 * n, rng):
        r = rng.uniform(p.glomerulus_diameter[0] / 2, p.glomerulus_diameter[1] / 2)
        cx, cy = (x + 0.5) * f, (y + 0.5) * f
        clear = all((cx - tx) ** 2 + (cy - ty) ** 2 > (r + tr + 8) ** 2 for tx, ty, tr in taken)
        if len(rings) == n or not clear or from_medulla[y, x] < r + 2 * f:
            continue
        offsets = _blob(rng, r, aspect=1.35, wobble=0.02)
        _draw_glomerulus(canvas, (cx, cy), offsets, rng, p)
        taken.append((cx, cy, r))
        sl, origin = canvas.patch((cx, cy), r)
        kept = _fill(tissue[sl].shape, _ring((cx, cy) - origin, offsets))
        kept &= tissue[sl] & ~medulla[sl]
        parts = _contours(kept, min_area=0.1 * math.pi * r * r)
        if parts:
            biggest = max(parts, key=lambda q: cv2.contourArea(q[0]))[0]
            rings.append((biggest + origin).astype(np.int32))
    return rings


def _folds(tissue, rng, count, f=8):
    """float32 (H, W) in [0, 1]: bands of folded tissue (soft-edged, wavy, 60-200 px wide)."""
    h, w = tissue.shape
    lh, lw = -(-h // f), -(-w // f)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    out = np.zeros((lh, lw), np.float32)
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        a, x0, y0 = rng.uniform(0, np.pi), rng.uniform(0, lw), rng.uniform(0, lh)
        dist = (xx - x0) * math.cos(a) + (yy - y0) * math.sin(a)
        dist += 0.04 * max(lh, lw) * _noise((lh, lw), max(lh, lw) / 4, rng)
        out = np.maximum(out, np.clip(rng.uniform(4, 12) - np.abs(dist), 0, 1))
    return cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR) * tissue


def _defocus(image, rng, count):
    """Blur a few round patches of ``image`` in place (out of the scanner's focus)."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        r = int(rng.uniform(300, 900))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, h), max(cx - r, 0), min(cx + r, w)
        crop = image[y0:y1, x0:x1]
        blurred = cv2.GaussianBlur(crop, (0, 0), rng.uniform(3, 8)).astype(np.float32)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        weight = np.clip(1.5 * (1 - np.hypot(xx - cx, yy - cy) / r), 0, 1).astype(np.float32)
        weight = weight[..., None]
        crop[:] = (crop * (1 - weight) + blurred * weight + 0.5).astype(np.uint8)


# Optical density per RGB channel of marker inks: green, blue, black.
_INKS = ((1.2, 0.3, 1.0), (1.1, 0.7, 0.2), (0.9, 0.9, 0.9))


def _ink(image, rng, count):
    """Pen strokes on the glass, in place: wavy thick lines of a marker ink."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        steps = rng.normal(0, 250, (int(rng.integers(3, 8)), 2))
        pts = rng.uniform(0, 1, 2) * (w, h) + np.cumsum(steps, 0)
        width = int(rng.integers(12, 40))
        x0, y0 = np.clip(pts.min(0) - width, 0, (w, h)).astype(int)
        x1, y1 = np.clip(pts.max(0) + width, 0, (w, h)).astype(int)
        if x1 <= x0 or y1 <= y0:
            continue
        stroke = np.zeros((y1 - y0, x1 - x0), np.uint8)
        line = (pts - (x0, y0)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(stroke, [line], False, 255, width, cv2.LINE_AA)
        od = np.asarray(_INKS[int(rng.integers(len(_INKS)))], np.float32) * rng.uniform(0.6, 1.2)
        alpha = stroke.astype(np.float32)[..., None] / 255
        crop = image[y0:y1, x0:x1]
        crop[:] = (crop * np.exp(-alpha * od.astype(np.float32)) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The dataset on disk


@dataclass(frozen=True)
class _SlidePlan:
    id: str
    split: str  # "train" or "test"
    layout: str  # "rgb" or "planes"
    patient: int  # index into the patients
    seed: np.random.SeedSequence


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return int(value)


def _check_size(size):
    if not isinstance(size, tuple | list) or len(size) != 2:
        raise ValueError(f"size must be (H, W), got {size!r}")
    h = _check_int("size[0] (H)", size[0], MIN_SIDE)
    w = _check_int("size[1] (W)", size[1], MIN_SIDE)
    return h, w


def _plan(slides, test_slides, seed, patients, p: Profile = MINI):
    """Per-slide plans (id, split, layout, patient, seed) and the patients' facts (pure)."""
    root = np.random.SeedSequence(seed)
    meta_seq, *slide_seqs = root.spawn(slides + 1)
    rng = np.random.default_rng(meta_seq)
    ids: list[str] = []
    while len(ids) < slides:
        new = f"{int(rng.integers(0, 16**9)):09x}"
        if new not in ids:
            ids.append(new)
    n_train = slides - test_slides
    # every patient gets a slide, the rest go to random patients (some have 2+ slides)
    owner = np.concatenate([np.arange(patients), rng.integers(0, patients, slides - patients)])
    owner = rng.permutation(owner)
    # Mostly one RGB page, as in the competition; each split holds both layouts where it can.
    planes = rng.random(slides) < 0.25
    for start, count in ((0, n_train), (n_train, test_slides)):
        pick = start + rng.permutation(count)
        if count >= 1:
            planes[pick[0]] = True
        if count >= 2:
            planes[pick[1]] = False
    return [
        _SlidePlan(
            id=ids[i],
            split="train" if i < n_train else "test",
            layout="planes" if planes[i] else "rgb",
            patient=int(owner[i]),
            seed=slide_seqs[i],
        )
        for i in range(slides)
    ], _patients(rng, patients, Stain(), p)


def _patients(rng, n, base: Stain, p: Profile = MINI):
    """Per-patient stain and demographics (numbers in the ranges of the real table)."""
    numbers = rng.choice(np.arange(60000, 70000), n, replace=False)
    people = []
    for i in range(n):
        height = float(round(rng.uniform(152, 193)))
        weight = float(round(rng.uniform(52, 115), 1))
        people.append(
            {
                "stain": _darken(base.jitter(rng, p.patient_stain), rng, p.patient_light),
                "patient_number": int(numbers[i]),
                "race": str(rng.choice(["White", "Black or African American", "Asian"])),
                "ethnicity": str(rng.choice(["Not Hispanic or Latino", "Hispanic or Latino"])),
                "sex": str(rng.choice(["Male", "Female"])),
                "age": int(rng.integers(28, 78)),
                "weight_kilograms": weight,
                "height_centimeters": height,
                "bmi_kg/m^2": round(weight / (height / 100) ** 2, 1),
            }
        )
    return people


def _darken(stain: Stain, rng, spread: float) -> Stain:
    """``stain`` with both densities scaled by ``exp(N(0, spread))`` (0: unchanged, no draw)."""
    if not spread:
        return stain
    gain = math.exp(rng.normal(0, spread))
    scaled = [tuple(v * gain for v in od) for od in (stain.pas, stain.haematoxylin)]
    return Stain(*scaled, stain.glass)


def _write_tiff(path: Path, image: np.ndarray, layout: str) -> None:
    # zlib level 1: 10x faster than the default level for ~5% bigger files
    options = dict(tile=(256, 256), compression="zlib", compressionargs={"level": 1})
    if layout == "rgb":
        tifffile.imwrite(path, image, photometric="rgb", metadata=None, **options)
    else:
        # One colour plane per page, shaped like the competition's (1, 1, 3, H, W) files.
        planes = np.ascontiguousarray(image.transpose(2, 0, 1))[None, None]
        tifffile.imwrite(path, planes, photometric="minisblack", **options)


def _features(polygons, name):
    """GeoJSON-like features as in the competition's json (closed rings of [x, y] ints)."""
    out = []
    for rings in polygons:
        coords = [[*r.tolist(), r[0].tolist()] for r in rings]
        out.append(
            {
                "type": "Feature",
                "id": "PathAnnotationObject",
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {
                    "classification": {"name": name, "colorRGB": _CLASS_COLOURS[name]},
                    "isLocked": False,
                    "measurements": [],
                },
            }
        )
    return out


def _write_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_csv(path: Path, header, rows) -> None:
    lines = [",".join(header)]
    for row in rows:
        lines.append(",".join(_csv_field(v) for v in row))
    path.write_text("\n".join(lines) + "\n")


def _csv_field(value) -> str:
    text = "" if value is None else str(value)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def _build(folder: Path, slides, test_slides, size, seed, patients, p=MINI) -> None:
    """Write the whole dataset into ``folder`` (an empty directory)."""
    plans, people = _plan(slides, test_slides, seed, patients, p)
    (folder / "train").mkdir()
    (folder / "test").mkdir()
    train_rows, test_ids, info_rows = [], [], []
    for plan in plans:
        slide_rng = np.random.default_rng(plan.seed)
        person = people[plan.patient]
        stain = person["stain"].jitter(slide_rng, p.slide_stain)
        slide = make_slide(size, slide_rng, stain, p)
        split_dir = folder / plan.split
        _write_tiff(split_dir / f"{plan.id}.tiff", slide.image, plan.layout)
        anatomy = _features(slide.cortex, "Cortex") + _features(slide.medulla, "Medulla")
        _write_json(split_dir / f"{plan.id}-anatomical-structure.json", anatomy)
        glom_file = ""
        if plan.split == "train":
            glom_file = f"{plan.id}.json"
            _write_json(
                split_dir / glom_file, _features([[r] for r in slide.glomeruli], "glomerulus")
            )
            train_rows.append((plan.id, encode(slide.mask)))
        else:
            test_ids.append(plan.id)
        info_rows.append(_info_row(plan.id, slide, size, glom_file, person, slide_rng))
    _write_csv(folder / "train.csv", ("id", "encoding"), train_rows)
    _write_csv(folder / "sample_submission.csv", ("id", "predicted"), [(i, "") for i in test_ids])
    _write_csv(folder / "HuBMAP-20-dataset_information.csv", INFO_COLUMNS, info_rows)
    manifest = {
        "generator": "kit.synthetic",
        "version": DATASET_VERSION,
        "params": _params(slides, test_slides, size, seed, patients, p.name),
        "layouts": {p.id: p.layout for p in plans},
    }
    _write_json(folder / MANIFEST_NAME, manifest)  # last: its presence means "complete"


def _info_row(slide_id, slide, size, glom_file, person, rng) -> tuple:
    """The slide's row of HuBMAP-20-dataset_information.csv (`INFO_COLUMNS`); draws the kidney
    side from ``rng``."""
    cortex = slide.region_fraction("Cortex")
    medulla = slide.region_fraction("Medulla")
    pct_cortex = int(round(100 * cortex / max(cortex + medulla, 1e-9)))
    return (
        f"{slide_id}.tiff",
        size[1],
        size[0],
        f"{slide_id}-anatomical-structure.json",
        glom_file,
        person["patient_number"],
        person["race"],
        person["ethnicity"],
        person["sex"],
        person["age"],
        person["weight_kilograms"],
        person["height_centimeters"],
        person["bmi_kg/m^2"],
        str(rng.choice(["Left", "Right"])),
        pct_cortex,
        100 - pct_cortex,
    )


def _params(slides, test_slides, size, seed, patients, profile="mini"):
    params = {
        "slides": slides,
        "test_slides": test_slides,
        "size": [int(size[0]), int(size[1])],
        "seed": seed,
        "patients": patients,
    }
    if profile != "mini":  # the mini manifest keeps its bytes from before profiles existed
        params["profile"] = profile
    return params


# Over 50 lines for its docstring (every argument's range); the body reads best whole: check the
# arguments, build in a folder beside ``out``, rename it into place.
def make_dataset(
    out: str | os.PathLike,
    *,
    slides: int = 8,
    test_slides: int = 2,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    patients: int | None = None,
    overwrite: bool = False,
    profile: str | Profile = "mini",
) -> Path:
    """Write a synthetic dataset in the competition's layout into the folder ``out``.

    Args:
        out: folder to create (its parent is created too). An existing empty folder is fine;
            a non-empty one is replaced only with ``overwrite=True``.
        slides: number of slides in all (>= 1), train and test together.
        test_slides: how many of them are test slides (0 <= test_slides < slides).
        size: (H, W) of every slide, each >= 256; default the profile's.
        seed: any int >= 0; the same seed gives the same files (ids, pixels, csv bytes).
        patients: number of patients the slides come from (1..slides); default about 0.6 per
            slide, so some patients have two or more slides.
        overwrite: replace an existing non-empty ``out``.
        profile: ``"mini"`` (small and easy, the default), ``"realistic"`` (real pixel scale and
            difficulty) or a `Profile`.

    Returns:
        ``out`` as a Path. Built in a temporary folder next to it and renamed into place, so
        ``out`` is either absent or complete.

    Raises:
        ValueError: a bad argument (the message names it), or ``out`` is a file.
        FileExistsError: ``out`` exists, is not empty and ``overwrite`` is False.
    """
    slides = _check_int("slides", slides, 1)
    test_slides = _check_int("test_slides", test_slides, 0, slides - 1)
    p = _profile(profile)
    size = _check_size(size or p.size)
    seed = _check_int("seed", seed, 0)
    if patients is None:
        patients = max(1, round(0.6 * slides))
    patients = _check_int("patients", patients, 1, slides)
    out = Path(out)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _build(work, slides, test_slides, size, seed, patients, p)
        _install(work, out, overwrite)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it"
        )


def _install(work: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``work`` folder to ``out``, replacing it if allowed."""
    _check_target(out, overwrite)
    atomic.swap_folder(work, out)


def is_complete(path: str | os.PathLike, params: dict | None = None) -> bool:
    """True if ``path`` holds a finished synthetic dataset of this version (and these params)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != DATASET_VERSION:
        return False
    return params is None or manifest.get("params") == params


def default_dataset(cache_dir: str | os.PathLike | None = None, profile: str = "mini") -> Path:
    """The kit's embedded default dataset: generated once into a cache folder, then reused.

    ``DEFAULT_PARAMS`` with the profile's slide size. The folder is
    ``<cache>/synthetic-v<DATASET_VERSION>`` (``synthetic-<profile>-v...`` for other profiles)
    where ``<cache>`` is ``cache_dir``, else ``$HUBMAP_KIT_CACHE``, else ``~/.cache/hubmap-kit``.
    Safe when several processes ask at once: each builds a private copy and renames it into
    place; a loser discards its copy.
    """
    root = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hubmap-kit"
    root = Path(root).expanduser()
    p = _profile(profile)
    kwargs = {**DEFAULT_PARAMS, "size": DEFAULT_PARAMS["size"] if p is MINI else p.size}
    name = "synthetic" if p is MINI else f"synthetic-{p.name}"
    target = root / f"{name}-v{DATASET_VERSION}"
    params = _params(**kwargs, profile=p.name)
    if is_complete(target, params):
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        built = make_dataset(work / "data", **kwargs, profile=p)
        # Another process may have finished first: keep theirs, drop ours.
        atomic.place_folder(built, target, keep=lambda t: is_complete(t, params))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
