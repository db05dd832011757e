//! The PyO3 bindings: `kafka_sidecar_transcoder_native`, a top-level module of its own (see
//! README.md, Packaging). Kept thin: the Python package turns the tuples returned here into its
//! `Transcoded` and its exceptions.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::kafka::{self, Error, Fetch};
use crate::proto;

/// transcode(data, topic, partition, fetch_offset, aborted, check_crcs, keys=False)
/// -> (wire, ends, offsets, sizes, next_offset, batches, error, keys)
///
/// `error` is None, ("corrupt", message) or ("legacy", message); the other items are what was
/// delivered before it. `keys` is each record's key (None for a null key) when asked for,
/// else None. The GIL is released while the batches are decoded.
#[pyfunction]
#[pyo3(signature = (data, topic, partition, fetch_offset, aborted, check_crcs, keys = false))]
#[allow(clippy::too_many_arguments)]
fn transcode<'py>(
    py: Python<'py>,
    data: &[u8],
    topic: &str,
    partition: i32,
    fetch_offset: i64,
    aborted: Option<Vec<(i64, i64)>>,
    check_crcs: bool,
    keys: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let aborted = aborted.as_deref();
    let fetch = Fetch { topic, partition, fetch_offset, aborted, check_crcs, keys };
    let (out, error) = py.detach(|| kafka::transcode(data, &fetch));
    let error = error.map(|error| match error {
        Error::Corrupt(message) => ("corrupt", message),
        Error::Legacy { magic, offset } => {
            ("legacy", format!("message format v{magic} (magic {magic}) at offset {offset}"))
        }
    });
    (
        PyBytes::new(py, &out.wire),
        PyList::new(py, out.ends)?,
        PyList::new(py, out.offsets)?,
        PyList::new(py, out.sizes)?,
        out.next_offset,
        out.batches,
        error,
        keys.then(|| {
            let keys = out.keys.iter().map(|key| key.as_deref().map(|k| PyBytes::new(py, k)));
            PyList::new(py, keys)
        })
        .transpose()?,
    )
        .into_pyobject(py)
}

/// (wire, ends, lo, hi, delivery_attempt): see `batch_bytes`.
type Run<'py> = (Bound<'py, PyBytes>, Bound<'py, PyList>, usize, usize, u32);

/// batch_bytes(batch_id, runs, response=False) -> bytes
///
/// A `Batch` (or a `ConsumeResponse` holding it) from runs of records: (wire, ends, lo, hi,
/// delivery_attempt), records `lo..hi` of a `transcode` result's `wire` and `ends`. Only the
/// ends a run needs are read, so a run costs its own records, not its fetch's.
#[pyfunction]
#[pyo3(signature = (batch_id, runs, *, response = false))]
fn batch_bytes<'py>(
    py: Python<'py>,
    batch_id: u64,
    runs: &Bound<'py, PyAny>,
    response: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let items: Vec<Run<'py>> =
        runs.try_iter()?.map(|item| item?.extract()).collect::<PyResult<_>>()?;
    let mut parts: Vec<(&[u8], u32)> = Vec::new();
    for (wire, ends, lo, hi, attempt) in &items {
        let wire = wire.as_bytes();
        let end_at = |i: usize| -> PyResult<usize> { ends.get_item(i)?.extract() };
        let mut start = if *lo == 0 { 0 } else { end_at(lo - 1)? };
        for i in *lo..*hi {
            let end = end_at(i)?;
            let record = wire.get(start..end).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err(format!(
                    "record {i} ends at {end}, outside its wire of {} bytes",
                    wire.len()
                ))
            })?;
            parts.push((record, *attempt));
            start = end;
        }
    }
    Ok(PyBytes::new(py, &proto::batch_message(batch_id, &parts, response)))
}

#[pymodule]
#[pyo3(name = "kafka_sidecar_transcoder_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(transcode, m)?)?;
    m.add_function(wrap_pyfunction!(batch_bytes, m)?)?;
    Ok(())
}
