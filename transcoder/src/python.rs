//! The PyO3 bindings: `kafka_sidecar_transcoder._native`. Kept thin: the Python package turns
//! the tuples returned here into its `Transcoded` and its exceptions.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

use crate::kafka::{self, Error, Fetch};
use crate::proto;

/// transcode(data, topic, partition, fetch_offset, aborted, check_crcs)
/// -> (wire, ends, offsets, sizes, next_offset, batches, error)
///
/// `error` is None, ("corrupt", message) or ("legacy", message); the other items are what was
/// delivered before it. The GIL is released while the batches are decoded.
#[pyfunction]
fn transcode<'py>(
    py: Python<'py>,
    data: &[u8],
    topic: &str,
    partition: i32,
    fetch_offset: i64,
    aborted: Option<Vec<(i64, i64)>>,
    check_crcs: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let fetch = Fetch { topic, partition, fetch_offset, aborted: aborted.as_deref(), check_crcs };
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
    )
        .into_pyobject(py)
}

/// batch_bytes(batch_id, records, response=False) -> bytes
///
/// A `Batch` (or a `ConsumeResponse` holding it) from (record bytes, delivery_attempt) pairs.
#[pyfunction]
#[pyo3(signature = (batch_id, records, *, response = false))]
fn batch_bytes<'py>(
    py: Python<'py>,
    batch_id: u64,
    records: &Bound<'py, PyAny>,
    response: bool,
) -> PyResult<Bound<'py, PyBytes>> {
    let items: Vec<(Bound<'py, PyBytes>, u32)> =
        records.try_iter()?.map(|item| item?.extract()).collect::<PyResult<_>>()?;
    let parts: Vec<(&[u8], u32)> = items.iter().map(|(b, a)| (b.as_bytes(), *a)).collect();
    Ok(PyBytes::new(py, &proto::batch_message(batch_id, &parts, response)))
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(transcode, m)?)?;
    m.add_function(wrap_pyfunction!(batch_bytes, m)?)?;
    Ok(())
}
