import numpy as np
import pytest
import scipy.sparse as sp

from ragsae.storage import (
    LOG2_VALUE_RANGE,
    load_compact_csr,
    log8_decode,
    log8_encode,
    save_compact_csr_atomic,
    storage_precision,
)


def pooled_like(n=30, m=8192, seed=0):
    return sp.random(n, m, density=0.02, random_state=seed, format="csr", dtype=np.float32) * 40


def test_compact_csr_round_trip_is_small_and_matches_storage_precision(tmp_path):
    codes = pooled_like()
    path = tmp_path / "codes.npz"
    save_compact_csr_atomic(path, codes)
    loaded = load_compact_csr(path)
    assert loaded.shape == codes.shape and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded.toarray(), storage_precision(codes).toarray())
    # half a log step (2**(10/255) - 1); values below 2**-8 are clamped up to it
    np.testing.assert_allclose(loaded.data, codes.data, rtol=2 ** (10 / 255) - 1 + 1e-6, atol=2.0**-8)
    with np.load(path) as arrays:
        assert arrays["indices"].dtype == np.uint16 and arrays["values"].dtype == np.uint8
    # 3 bytes per stored latent plus row pointers and the npz headers.
    assert path.stat().st_size < 3 * codes.nnz + 8 * (codes.shape[0] + 1) + 2500
    assert not list(tmp_path.glob(".*.tmp"))


def test_wide_dictionaries_keep_int32_ids(tmp_path):
    codes = sp.csr_matrix(([1.0], ([0], [70_000])), shape=(1, 80_000), dtype=np.float32)
    save_compact_csr_atomic(tmp_path / "c.npz", codes)
    assert load_compact_csr(tmp_path / "c.npz")[0, 70_000] == 1.0


def test_log_scale_values_are_idempotent_and_clamped():
    values = np.geomspace(2.0**-10, 2.0**14, 2000)
    steps = log8_encode(values)
    decoded = log8_decode(steps)
    assert (log8_encode(decoded) == steps).all()  # rounding twice changes nothing
    inside = (values >= 2.0 ** LOG2_VALUE_RANGE[0]) & (values <= 2.0 ** LOG2_VALUE_RANGE[1])
    np.testing.assert_allclose(decoded[inside], values[inside], rtol=2 ** (10 / 255) - 1 + 1e-6)
    assert decoded.min() == pytest.approx(2.0**-8) and decoded.max() == pytest.approx(2.0**12)
    assert (np.diff(steps.astype(int)) >= 0).all()  # order kept


def test_non_positive_or_non_finite_values_are_refused(tmp_path):
    for bad in (0.0, -1.0, np.inf, np.nan):
        codes = sp.csr_matrix((np.array([1.0, bad], dtype=np.float32), ([0, 0], [0, 1])), shape=(1, 4))
        with pytest.raises(ValueError, match="finite positive"):
            save_compact_csr_atomic(tmp_path / "c.npz", codes)
    assert not list(tmp_path.iterdir())


def test_corrupt_files_are_named(tmp_path):
    path = tmp_path / "codes.npz"
    np.savez(
        path,
        shape=np.array([2, 10]),
        indptr=np.array([0, 1, 5]),
        indices=np.array([1, 2], dtype=np.uint16),
        values=np.ones(2, dtype=np.uint8),
        log2_range=np.array(LOG2_VALUE_RANGE),
    )
    with pytest.raises(ValueError, match="codes.npz: inconsistent"):
        load_compact_csr(path)
    np.savez(
        path,
        shape=np.array([1, 10]),
        indptr=np.array([0, 1]),
        indices=np.array([12], dtype=np.uint16),
        values=np.ones(1, dtype=np.uint8),
        log2_range=np.array(LOG2_VALUE_RANGE),
    )
    with pytest.raises(ValueError, match="column index"):
        load_compact_csr(path)
    good = {"shape": np.array([1, 10]), "indptr": np.array([0, 1]), "indices": np.array([3], dtype=np.uint16)}
    np.savez(path, **good, values=np.ones(1, dtype=np.float16), log2_range=np.array(LOG2_VALUE_RANGE))
    with pytest.raises(ValueError, match="codes.npz: values are float16, expected uint8"):
        load_compact_csr(path)
    np.savez(path, **good, values=np.ones(1, dtype=np.uint8), log2_range=np.array([3.0, 1.0]))
    with pytest.raises(ValueError, match="log2_range"):
        load_compact_csr(path)
    np.savez(path, shape=np.array([1, 10]))
    with pytest.raises(ValueError, match="missing array"):
        load_compact_csr(path)
    path.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a readable"):
        load_compact_csr(path)


def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path):
    from ragsae.storage import atomic_output, write_text_atomic

    path = tmp_path / "out.md"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_output(path, "w") as handle:
        handle.write("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.md"]


def test_atomic_folders_get_the_umask_permissions_whatever_wrote_them(tmp_path):
    import os
    import stat

    from ragsae.storage import atomic_folder

    previous = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "out") as folder:
            (folder / "private").write_text("x")
            os.chmod(folder / "private", 0o600)  # as safetensors creates its files
            (folder / "sub").mkdir(mode=0o700)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out" / "private").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
