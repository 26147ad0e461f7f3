import numpy as np
import pytest

from cdinn_stream.core.simulate import diffraction_intensity, simulate
from cdinn_stream.live.crop import clean_frames, crop_around_peaks, crop_frames, find_peaks


def _detector_frame(intensity, peak, shape=(256, 256), background=0.0):
    """Place a centred 32x32 pattern so that its zero frequency sits at ``peak`` of a frame."""
    frame = np.full(shape, background, np.float32)
    r0, c0 = peak[0] - 16, peak[1] - 16
    rows = slice(max(r0, 0), min(r0 + 32, shape[0]))
    cols = slice(max(c0, 0), min(c0 + 32, shape[1]))
    frame[rows, cols] += intensity[rows.start - r0 : rows.stop - r0, cols.start - c0 : cols.stop - c0]
    return frame


@pytest.fixture(scope="module")
def patterns():
    """Patterns of unstrained crystals: their brightest pixel is the zero frequency, at (16, 16)."""
    s = simulate(8, 32, seed=31)
    return diffraction_intensity(s.amplitude, np.zeros_like(s.phase)) * 1e4


def test_crop_recovers_the_pattern_exactly(patterns):
    peaks = [(100, 140), (50, 60), (200, 30), (128, 128)]
    frames = np.stack([_detector_frame(p, pk) for p, pk in zip(patterns[:4], peaks, strict=True)])
    crops = crop_around_peaks(frames, 32)
    np.testing.assert_array_equal(crops.peaks, peaks)
    np.testing.assert_allclose(crops.frames, patterns[:4])
    np.testing.assert_array_equal(crops.origins, np.array(peaks) - 16)


def test_hot_pixels_background_and_dead_pixels(patterns):
    frame = _detector_frame(patterns[0], (90, 170), background=5.0)
    frame[10, 10] = 1e9  # a hot pixel far brighter than the peak
    frame[200, 40] = np.nan  # dead pixel
    frame[:, 128:131] = -1  # a detector gap read out as negative
    crops = crop_around_peaks(frame, 32)
    assert tuple(crops.peaks[0]) == (90, 170)
    assert np.isfinite(crops.frames).all() and crops.frames.min() >= 0


def test_mask_removes_pixels(patterns):
    frame = _detector_frame(patterns[1], (128, 128))
    mask = np.ones(frame.shape, bool)
    mask[120:125, :] = False
    clean = clean_frames(frame, mask)
    assert np.all(clean[0, 120:125] == 0)
    assert tuple(find_peaks(clean)[0]) == (128, 128)


@pytest.mark.parametrize("peak", [(2, 2), (253, 128), (128, 255), (0, 0)])
def test_peak_near_the_edge_is_padded_not_shifted(patterns, peak):
    frame = _detector_frame(patterns[2], peak)
    crops = crop_around_peaks(frame, 32)
    assert crops.frames.shape == (1, 32, 32)
    assert tuple(np.unravel_index(crops.frames[0].argmax(), (32, 32))) == (16, 16)
    np.testing.assert_array_equal(crops.peaks[0], peak)


def test_binning_a_larger_window(patterns):
    frame = _detector_frame(patterns[3], (128, 100))
    crops = crop_around_peaks(frame, 16, bin=2)
    assert crops.frames.shape == (1, 16, 16)
    assert crops.frames.sum() == pytest.approx(frame[112:144, 84:116].sum(), rel=1e-5)
    assert tuple(np.unravel_index(crops.frames[0].argmax(), (16, 16))) == (8, 8)


def test_too_small_frames():
    with pytest.raises(ValueError, match="too small"):
        crop_around_peaks(np.ones((2, 2)), 32)


def test_despeckle_clips_isolated_hot_pixels_and_keeps_peaks(patterns):
    from cdinn_stream.live.crop import despeckle

    frame = _detector_frame(patterns[0], (40, 40), shape=(80, 80))
    spiky = frame.copy()
    spiky[5, 70] = 1e9
    out = despeckle(spiky[None])[0]
    assert out[5, 70] == spiky[4:7, 69:72].flatten()[[0, 1, 2, 3, 5, 6, 7, 8]].max()
    assert out[40, 40] >= 0.5 * frame[40, 40], "a peak has bright neighbours and keeps most of its height"
    assert np.all(out <= spiky)


def test_crop_frames_matches_a_pixel_by_pixel_reference_at_edges_and_with_binning():
    rng = np.random.default_rng(3)
    for _ in range(100):
        n, (h, w) = int(rng.integers(1, 6)), rng.integers(6, 50, 2)
        size, b = int(rng.choice([4, 8, 16])), int(rng.choice([1, 2, 3]))
        frames = rng.random((n, h, w)).astype(np.float32)
        peaks = np.stack([rng.integers(0, h, n), rng.integers(0, w, n)], axis=1)
        crops = crop_frames(frames, peaks, size, bin=b)
        for k in range(n):
            o = peaks[k] - (size // 2) * b - b // 2
            ref = np.zeros((size * b, size * b), np.float32)
            for i in range(size * b):
                for j in range(size * b):
                    r, c = o[0] + i, o[1] + j
                    if 0 <= r < h and 0 <= c < w:
                        ref[i, j] = frames[k, r, c]
            ref = ref.reshape(size, b, size, b).sum(axis=(1, 3))
            np.testing.assert_allclose(crops.frames[k], ref, rtol=1e-6)
            np.testing.assert_array_equal(crops.origins[k], o)


@pytest.mark.parametrize("box", [1, 2, 3, 5])
def test_box_sum_is_the_zero_padded_uniform_filter(box):
    from scipy.ndimage import uniform_filter

    from cdinn_stream.live.crop import box_sum

    x = np.random.default_rng(box).random((4, 13, 17)).astype(np.float32)
    ref = uniform_filter(x, size=(1, box, box), mode="constant") * box * box
    np.testing.assert_allclose(box_sum(x, box), ref, rtol=1e-5, atol=1e-5)


def test_no_frames_and_integer_frames():
    from cdinn_stream.live.crop import box_sum

    empty = crop_frames(np.zeros((0, 8, 8), np.float32), np.zeros((0, 2), int), 16)
    assert empty.frames.shape == (0, 16, 16) and empty.origins.shape == (0, 2)
    counts = np.full((1, 6, 6), 5000, np.uint16)  # a 5x5 box of 5000 counts would wrap in uint16
    assert box_sum(counts, 5)[0, 3, 3] == 125_000


def _drifting_run(n: int, side: int = 512, jump_at: int | None = None, seed: int = 0):
    """Detector frames ``(n, side, side)``: one Bragg pattern drifting half a pixel a frame, Poisson
    counts, background, hot pixels and a gap (masked); the peak jumps 200 px at ``jump_at``."""
    from cdinn_stream.core.simulate import simulate

    rng = np.random.default_rng(seed)
    pattern = simulate(1, 32, seed=seed, pad=2).intensity[0]  # 64 x 64, peak at 32
    pattern = pattern / pattern.sum() * 2e6
    frames = rng.poisson(0.05, (n, side, side)).astype(np.float32)
    centres = []
    for i in range(n):
        r, c = 150 + i // 2, 170 + (i * 3) // 4
        if jump_at is not None and i >= jump_at:
            r, c = r + 200, c + 150
        frames[i, r - 32 : r + 32, c - 32 : c + 32] += rng.poisson(pattern)
        centres.append((r, c))
    hot = rng.integers(0, side, (n, 5, 2))
    frames[np.arange(n)[:, None], hot[..., 0], hot[..., 1]] = 5e4
    mask = np.ones((side, side), bool)
    mask[:, 300:304] = False  # a gap between modules
    return frames, mask, np.array(centres)


def test_tracked_peaks_give_the_crops_of_full_searches_on_a_drifting_run():
    from cdinn_stream.live.callback import FrameCropper

    frames, mask, _ = _drifting_run(60)
    tracked, full = FrameCropper(32, mask=mask), FrameCropper(32, mask=mask, track=False)
    for start in range(0, 60, 5):  # pages of 5
        seq = np.arange(start + 1, start + 6)
        a = tracked.block("run", "primary", frames[start : start + 5], seq, np.zeros(5))
        b = full.block("run", "primary", frames[start : start + 5], seq, np.zeros(5))
        np.testing.assert_array_equal(a.peaks, b.peaks)
        np.testing.assert_array_equal(a.origins, b.origins)
        np.testing.assert_array_equal(a.frames, b.frames)
    counts = tracked.forget("run")
    # the first page's first frame searched whole, every other frame tracked
    assert counts["tracked"] == 59 and counts["full"] == 1 and counts["fallback"] == 0 and counts["jump"] == 0
    assert full.forget("run") == {}


def test_a_peak_that_jumps_is_found_on_the_next_page():
    from cdinn_stream.live.callback import FrameCropper

    frames, mask, centres = _drifting_run(40, jump_at=23)
    tracked, full = FrameCropper(32, mask=mask), FrameCropper(32, mask=mask, track=False)
    for start in range(0, 40, 4):
        seq = np.arange(start + 1, start + 5)
        a = tracked.block("run", "primary", frames[start : start + 4], seq, np.zeros(4))
        b = full.block("run", "primary", frames[start : start + 4], seq, np.zeros(4))
        np.testing.assert_array_equal(a.peaks, b.peaks)  # the jump's own page included: searched whole
        np.testing.assert_array_equal(a.frames, b.frames)
        assert np.abs(a.peaks - centres[start : start + 4]).max() <= 3
    counts = tracked.forget("run")
    assert counts["jump"] == 1 and counts["fallback"] >= 1


def _compare_pages(frames, mask, page, **kw):
    """Tracked and whole-frame crops page by page; the tracker's counts."""
    from cdinn_stream.live.callback import FrameCropper

    tracked, full = FrameCropper(32, mask=mask, **kw), FrameCropper(32, mask=mask, track=False)
    for start in range(0, len(frames), page):
        chunk = frames[start : start + page]
        seq = np.arange(start + 1, start + 1 + len(chunk))
        a = tracked.block("run", "primary", chunk, seq, np.zeros(len(chunk)))
        b = full.block("run", "primary", chunk, seq, np.zeros(len(chunk)))
        np.testing.assert_array_equal(a.peaks, b.peaks, err_msg=f"page at frame {start + 1}")
        np.testing.assert_array_equal(a.frames, b.frames)
    return tracked.forget("run")


@pytest.mark.parametrize("seed", range(6))
def test_a_weak_peak_that_jumps_over_a_strong_background_is_not_lost_in_the_noise(seed):
    """The window's background holds more counts than the peak: after the jump the window's
    total hardly drops, but the peak's own signal does (each seed puts the noise's brightest blob
    elsewhere in the window)."""
    rng = np.random.default_rng(seed)
    from cdinn_stream.core.simulate import simulate

    pattern = simulate(1, 32, seed=seed, pad=2).intensity[0]
    pattern = pattern / pattern.sum() * 3e4
    frames = rng.poisson(3.0, (16, 512, 512)).astype(np.float32)
    for i in range(16):
        r, c = (150, 170) if i < 10 else (380, 320)  # jumps at the third frame of a page of four
        frames[i, r - 32 : r + 32, c - 32 : c + 32] += rng.poisson(pattern)
    counts = _compare_pages(frames, None, 4)
    assert counts["jump"] == 1 and counts["fallback"] >= 2


def test_a_peak_that_runs_to_the_window_edge_within_a_page_is_searched_whole():
    from cdinn_stream.core.simulate import simulate

    rng = np.random.default_rng(4)
    pattern = simulate(1, 32, seed=4, pad=2).intensity[0]
    pattern = pattern / pattern.sum() * 1e6
    frames = rng.poisson(0.1, (24, 600, 600)).astype(np.float32)
    for i in range(24):  # 12 px a frame: a page of 8 crosses half a 176-px window
        r, c = 150 + 12 * i, 200
        frames[i, r - 32 : r + 32, c - 32 : c + 32] += rng.poisson(pattern)
    counts = _compare_pages(frames, None, 8)
    assert counts["fallback"] >= 1 and counts["tracked"] >= 1


def test_search_windows_too_small_for_the_crop_are_refused_and_counts_reach_the_run_summary():
    from cdinn_stream.live.crop import PeakTracker

    with pytest.raises(ValueError, match="too small"):
        PeakTracker(44, 60)
    frames, mask, _ = _drifting_run(12)

    class Keep:
        def __init__(self):
            self.summaries = []

        def submit(self, block): return True
        def open_run(self, uid, start): pass
        def close_run(self, uid, summary): self.summaries.append(summary)

    from event_model import compose_run

    from cdinn_stream.live.callback import FrameCropper, RunReconstructor

    engine = Keep()
    run = compose_run()
    rr = RunReconstructor(run.start_doc, cropper=FrameCropper(32, mask=mask), engine=engine)
    desc = run.compose_descriptor(name="primary", data_keys={"img": {"source": "s", "dtype": "array",
                                                                     "shape": [512, 512]}})
    rr("descriptor", desc.descriptor_doc)
    for start in (0, 6):
        rr("event_page", desc.compose_event_page(data={"img": frames[start : start + 6]}, timestamps={"img": [0] * 6},
                                                 seq_num=list(range(start + 1, start + 7)), time=[0.0] * 6))
    rr("stop", run.compose_stop())
    assert engine.summaries[0]["peak_search"] == {"tracked": 11, "full": 1, "fallback": 0, "jump": 0}


def test_native_eiger_frames_track_like_full_searches():
    """EIGER 1M and 4M geometry (module gaps masked and empty); on 1M frames of a drifting peak
    that jumps, tracked crops equal whole-frame crops and the peaks are where the simulator put them."""
    from cdinn_stream.lab.sim import EIGER_1M, EIGER_4M, native_frames

    assert EIGER_1M.shape == (1065, 1030) and EIGER_4M.shape == (2167, 2070)
    mask = EIGER_1M.mask()
    assert not mask[514:551].any() and mask[:514].all() and mask[551:].all()
    frames, mask, truth = native_frames(15, EIGER_1M, jump_every=8, seed=2)
    assert frames.dtype == np.uint32 and not frames[:, ~mask].any()
    counts = _compare_pages(frames, mask, 3)
    assert counts["tracked"] >= 6 and counts["jump"] == 1
    from cdinn_stream.live.callback import FrameCropper

    block = FrameCropper(32, mask=mask, track=False).block("r", "primary", frames, np.arange(15), np.zeros(15))
    assert np.abs(block.peaks - truth).max() <= 2


def test_the_check_every_k_frames_searches_one_frame_of_its_page_whole():
    """A scheduled check searches the page's first frame whole and tracks the rest from it: one
    full search per check, whatever the page size, and the crops stay those of full searches."""
    from cdinn_stream.live.callback import FrameCropper

    frames, mask, _ = _drifting_run(40)
    tracked, full = FrameCropper(32, mask=mask, track_every=10), FrameCropper(32, mask=mask, track=False)
    for start in range(0, 40, 8):  # pages of 8: checks due at frames 0, 16 (10 after 0), 32
        seq = np.arange(start, start + 8)
        a = tracked.block("run", "primary", frames[start : start + 8], seq, np.zeros(8))
        b = full.block("run", "primary", frames[start : start + 8], seq, np.zeros(8))
        np.testing.assert_array_equal(a.frames, b.frames)
    assert tracked.forget("run") == {"tracked": 37, "full": 3, "fallback": 0, "jump": 0}


@pytest.mark.parametrize("dtype", ["uint32", "uint16", "int32", "float32"])
def test_coarse_search_lands_near_the_peak_whatever_the_counts(dtype):
    """One pass of 4x4 sums from the raw counts finds the Bragg peak within a few pixels of the full
    search on native frames (gaps, hot pixels), with garbage in the gaps (-1, NaN, 2**32 - 1)."""
    from cdinn_stream.lab.sim import EIGER_1M, native_frames
    from cdinn_stream.live.crop import Scratch, coarse_peaks, good_bins

    frames, mask, true = native_frames(6, EIGER_1M, seed=11, jump_every=2)
    raw = frames.astype(dtype)
    garbage = {"uint32": 2**32 - 1, "uint16": 2**16 - 1, "int32": -1, "float32": np.nan}[dtype]
    raw[:, ~mask] = garbage
    found = find_peaks(clean_frames(raw, mask))
    rough = coarse_peaks(raw, good_bins(mask))
    assert np.abs(rough - found).max() <= 4
    assert np.abs(found - true).max() <= 3
    scratch = Scratch()  # work arrays kept between calls: the same answers, whatever came before
    for part in (raw[:3], raw[3:], raw[:1], raw[::-1]):
        np.testing.assert_array_equal(coarse_peaks(part, good_bins(mask), scratch=scratch),
                                      coarse_peaks(part, good_bins(mask)))


def test_a_page_whose_first_frame_is_dark_is_searched_whole_not_lost():
    """A shutter-closed first frame leaves nothing to track from: the page is searched whole, the
    dark frame rejected as empty, the others cropped as whole-frame searches crop them."""
    from cdinn_stream.lab.sim import EIGER_1M, native_frames
    from cdinn_stream.live.callback import FrameCropper

    frames, mask, _ = native_frames(5, EIGER_1M, seed=6)
    frames[0] = 0
    tracked, full = FrameCropper(32, mask=mask), FrameCropper(32, mask=mask, track=False)
    a = tracked.block("run", "primary", frames, np.arange(1, 6), np.zeros(5))
    b = full.block("run", "primary", frames, np.arange(1, 6), np.zeros(5))
    np.testing.assert_array_equal(a.seq_nums, [2, 3, 4, 5])
    np.testing.assert_array_equal(a.frames, b.frames)
    assert tracked.rejections.counts["empty frame"] == 1
