import numpy as np
import pytest
import scipy.sparse as sp

from ragsae.storage import load_compact_csr, save_compact_csr_atomic, storage_precision


def pooled_like(n=30, m=8192, seed=0):
    return sp.random(n, m, density=0.02, random_state=seed, format="csr", dtype=np.float32) * 40


def test_compact_csr_round_trip_is_small_and_matches_storage_precision(tmp_path):
    codes = pooled_like()
    path = tmp_path / "codes.npz"
    save_compact_csr_atomic(path, codes)
    loaded = load_compact_csr(path)
    assert loaded.shape == codes.shape and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded.toarray(), storage_precision(codes).toarray())
    np.testing.assert_allclose(loaded.toarray(), codes.toarray(), rtol=1e-3)
    with np.load(path) as arrays:
        assert arrays["indices"].dtype == np.uint16 and arrays["values"].dtype == np.float16
    # 4 bytes per stored latent plus row pointers and the npz headers.
    assert path.stat().st_size < 4 * codes.nnz + 8 * (codes.shape[0] + 1) + 2000
    assert not list(tmp_path.glob(".*.tmp"))


def test_wide_dictionaries_keep_int32_ids(tmp_path):
    codes = sp.csr_matrix(([1.0], ([0], [70_000])), shape=(1, 80_000), dtype=np.float32)
    save_compact_csr_atomic(tmp_path / "c.npz", codes)
    assert load_compact_csr(tmp_path / "c.npz")[0, 70_000] == 1.0


def test_overflow_is_refused(tmp_path):
    codes = sp.csr_matrix(np.array([[1e6, 0.0]], dtype=np.float32))
    with pytest.raises(ValueError, match="float16"):
        save_compact_csr_atomic(tmp_path / "c.npz", codes)


def test_corrupt_files_are_named(tmp_path):
    path = tmp_path / "codes.npz"
    np.savez(
        path,
        shape=np.array([2, 10]),
        indptr=np.array([0, 1, 5]),
        indices=np.array([1, 2], dtype=np.uint16),
        values=np.ones(2, dtype=np.float16),
    )
    with pytest.raises(ValueError, match="codes.npz: inconsistent"):
        load_compact_csr(path)
    np.savez(
        path,
        shape=np.array([1, 10]),
        indptr=np.array([0, 1]),
        indices=np.array([12], dtype=np.uint16),
        values=np.ones(1, dtype=np.float16),
    )
    with pytest.raises(ValueError, match="column index"):
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
