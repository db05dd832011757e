//! A fetch's record batches (message format v2, magic 2) to `Record` protobuf bytes, with the
//! semantics of aiokafka 0.14's consumer: `PartitionRecords._unpack_records` in
//! aiokafka/consumer/fetcher.py over `MemoryRecords` and `DefaultRecordBatch` (the Cython
//! classes in aiokafka/record/_crecords, which aiokafka uses when they are built).

use std::collections::{HashSet, VecDeque};

use crate::codec;
use crate::proto::{self, RecordFields};

/// BaseOffset Int64, Length Int32: what precedes every batch, whatever its magic.
const LOG_OVERHEAD: usize = 12;
/// The smallest Length aiokafka accepts (a v0 message's CRC, magic, attributes, key and value
/// lengths).
const MIN_LENGTH: i32 = 14;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
/// The CRC covers the batch from its attributes on.
const ATTRIBUTES_OFFSET: usize = 21;
/// The v2 batch header, up to and including the records count.
const HEADER_LEN: usize = 61;

const CODEC_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_MASK: i16 = 0x08;
const TRANSACTIONAL_MASK: i16 = 0x10;
const CONTROL_MASK: i16 = 0x20;

/// Why a fetch could not be transcoded (entirely).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// What aiokafka raises as CorruptRecordException (or lets escape as another exception):
    /// bad CRC, bad structure, undecompressable data.
    Corrupt(String),
    /// A message set in the legacy formats (magic 0 or 1): left to aiokafka's reader.
    Legacy { magic: u8, offset: i64 },
}

/// The records delivered from one fetch of one partition.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcoded {
    /// The `Record` messages, back to back, without `delivery_attempt`.
    pub wire: Vec<u8>,
    /// Where each record ends in `wire`.
    pub ends: Vec<usize>,
    pub offsets: Vec<i64>,
    /// len(key) + len(value) + Σ (characters of the header key + len(header value)).
    pub sizes: Vec<u64>,
    /// Where the consumer fetches next: past the last batch consumed, even one skipped.
    pub next_offset: i64,
    /// Complete batches consumed (delivered or skipped).
    pub batches: usize,
    /// Each record's key (None: a null key), when `Fetch::keys` asked for them.
    pub keys: Vec<Option<Vec<u8>>>,
}

/// Parameters of a fetch, as `PartitionRecords` gets them.
#[derive(Debug, Clone, Copy)]
pub struct Fetch<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// The position the fetch was made at: records below it are skipped.
    pub fetch_offset: i64,
    /// The fetch response's aborted transactions (producer_id, first_offset) under
    /// read_committed; None under read_uncommitted.
    pub aborted: Option<&'a [(i64, i64)]>,
    pub check_crcs: bool,
    /// Also hand over each record's key (for `ordering: key`).
    pub keys: bool,
}

/// Transcodes `data` (a fetch response's records for one partition). On an error, returns it
/// with what was delivered before it, as aiokafka would have yielded those records before
/// raising.
pub fn transcode(data: &[u8], fetch: &Fetch<'_>) -> (Transcoded, Option<Error>) {
    let mut state = State::new(fetch);
    let error = state.run(data).err();
    (state.out, error)
}

struct State<'f> {
    fetch: &'f Fetch<'f>,
    prefix: Vec<u8>,
    /// PartitionRecords._aborted_transactions: sorted by first offset, consumed from the front.
    aborted: VecDeque<(i64, i64)>,
    aborted_producers: HashSet<i64>,
    out: Transcoded,
}

impl<'f> State<'f> {
    fn new(fetch: &'f Fetch<'f>) -> Self {
        let mut aborted = fetch.aborted.unwrap_or_default().to_vec();
        // fetcher.py:182: sorted(aborted_transactions or [], key=lambda x: x[1]) (stable).
        aborted.sort_by_key(|&(_, first_offset)| first_offset);
        State {
            fetch,
            prefix: proto::record_prefix(fetch.topic, fetch.partition),
            aborted: aborted.into(),
            aborted_producers: HashSet::new(),
            out: Transcoded { next_offset: fetch.fetch_offset, ..Transcoded::default() },
        }
    }

    /// fetcher.py:209-273 `_unpack_records`, over memory_records.pyx's framing.
    fn run(&mut self, data: &[u8]) -> Result<(), Error> {
        let mut pos = 0;
        while let Some(batch) = next_batch(data, &mut pos)? {
            self.batch(batch)?;
            self.out.batches += 1;
        }
        Ok(())
    }

    fn batch(&mut self, data: &[u8]) -> Result<(), Error> {
        let magic = data[MAGIC_OFFSET];
        if magic < 2 {
            return Err(Error::Legacy { magic, offset: be_i64(data, 0) });
        }
        if magic != 2 {
            return Err(corrupt(format!("Unknown record batch magic {magic}")));
        }
        let header = Header::parse(data)?;
        // fetcher.py:216-219.
        if self.fetch.check_crcs && crc32c::crc32c(&data[ATTRIBUTES_OFFSET..]) != header.crc {
            return Err(corrupt(format!(
                "Invalid CRC - TopicPartition(topic='{}', partition={})",
                self.fetch.topic, self.fetch.partition
            )));
        }
        let next_offset = header.next_offset()?;
        // fetcher.py:221-249. A v2 batch's producer_id is never None (-1 when it has none).
        if self.fetch.aborted.is_some() {
            self.consume_aborted_up_to(header.base_offset);
            if header.is_control() && contains_abort_marker(&header, &data[HEADER_LEN..])? {
                self.aborted_producers.remove(&header.producer_id);
            }
            if header.is_transactional() && self.aborted_producers.contains(&header.producer_id) {
                self.out.next_offset = next_offset;
                return Ok(());
            }
        }
        // fetcher.py:251-254: control batches are skipped under either isolation level.
        if header.is_control() {
            self.out.next_offset = next_offset;
            return Ok(());
        }
        let body = &data[HEADER_LEN..];
        let decompressed;
        let body = match header.codec() {
            codec::NONE => body,
            codec => {
                decompressed = codec::decompress(codec, body).map_err(corrupt)?;
                &decompressed[..]
            }
        };
        self.records(&header, body)?;
        // fetcher.py:266-273.
        self.out.next_offset = next_offset;
        Ok(())
    }

    /// fetcher.py:256-264 over default_records.pyx `__next__`.
    fn records(&mut self, header: &Header, body: &[u8]) -> Result<(), Error> {
        let mut reader = Reader::new(body);
        let mut headers = Vec::new();
        for _ in 0..header.records_count.max(0) {
            let record = read_record(header, &mut reader, &mut headers)?;
            if record.offset < self.out.next_offset {
                // Below the fetch position (fetcher.py:259-261).
                continue;
            }
            let out = &mut self.out;
            proto::put_record(&mut out.wire, &self.prefix, &record, &headers);
            out.ends.push(out.wire.len());
            out.offsets.push(record.offset);
            out.sizes.push(flow_control_size(&record, &headers));
            if self.fetch.keys {
                out.keys.push(record.key.map(<[u8]>::to_vec));
            }
            out.next_offset = record.offset.wrapping_add(1);
        }
        if !reader.rest().is_empty() {
            return Err(corrupt(format!(
                "{} unconsumed bytes after all records consumed",
                reader.rest().len()
            )));
        }
        Ok(())
    }

    /// fetcher.py:275-285.
    fn consume_aborted_up_to(&mut self, batch_offset: i64) {
        while let Some(&(producer_id, first_offset)) = self.aborted.front() {
            if first_offset > batch_offset {
                break;
            }
            self.aborted_producers.insert(producer_id);
            self.aborted.pop_front();
        }
    }
}

/// memory_records.pyx `_get_next`: the next complete batch, or None at the end or before a
/// batch cut short (brokers send a partial batch at the end of a fetch).
fn next_batch<'a>(data: &'a [u8], pos: &mut usize) -> Result<Option<&'a [u8]>, Error> {
    let rest = &data[*pos..];
    if rest.len() < LOG_OVERHEAD {
        return Ok(None);
    }
    let length = be_i32(rest, 8);
    if length < MIN_LENGTH {
        return Err(corrupt(format!(
            "Record size is less than the minimum record overhead ({MIN_LENGTH})"
        )));
    }
    let end = LOG_OVERHEAD + length as usize;
    if end > rest.len() {
        return Ok(None);
    }
    *pos += end;
    Ok(Some(&rest[..end]))
}

/// fetcher.py:287-296 `_contains_abort_marker`: the control batch's first record, read from
/// the batch as it is (aiokafka calls `next()` without `iter()`, so nothing is decompressed),
/// has key version 0 and type 0 (control_record.py `ABORT_MARKER`).
fn contains_abort_marker(header: &Header, body: &[u8]) -> Result<bool, Error> {
    if header.records_count <= 0 {
        return Err(corrupt(if body.is_empty() {
            "Control batch did not contain any records".to_owned()
        } else {
            format!("{} unconsumed bytes after all records consumed", body.len())
        }));
    }
    let record = read_record(header, &mut Reader::new(body), &mut Vec::new())?;
    // ControlRecord.parse: struct ">HH" over the key.
    match record.key {
        Some([v0, v1, t0, t1, ..]) => {
            Ok(u16::from_be_bytes([*v0, *v1]) == 0 && u16::from_be_bytes([*t0, *t1]) == 0)
        }
        Some(_) => Err(corrupt("Control record key shorter than 4 bytes")),
        None => Err(corrupt("Control record without a key")),
    }
}

/// default_records.pyx `_read_msg`: one record of a v2 batch. `headers` receives its headers.
fn read_record<'a>(
    batch: &Header,
    reader: &mut Reader<'a>,
    headers: &mut Vec<(&'a str, Option<&'a [u8]>)>,
) -> Result<RecordFields<'a>, Error> {
    let length = reader.varint()?;
    let start = reader.pos;
    // Attributes: an Int8 in the protocol, read as a varint by aiokafka (both
    // implementations); unused.
    reader.varint()?;
    let timestamp_delta = reader.varint()?;
    let offset_delta = reader.varint()?;
    let key = reader.nullable_bytes()?;
    let value = reader.nullable_bytes()?;
    let header_count = reader.varint()?;
    if header_count < 0 {
        return Err(corrupt(format!("Found invalid number of record headers {header_count}")));
    }
    headers.clear();
    for _ in 0..header_count {
        let key =
            reader.nullable_bytes()?.ok_or_else(|| corrupt("Invalid negative header key size"))?;
        // aiokafka decodes header keys as UTF-8 (strictly: a bad one raises).
        let key = std::str::from_utf8(key)
            .map_err(|e| corrupt(format!("Header key is not UTF-8: {e}")))?;
        headers.push((key, reader.nullable_bytes()?));
    }
    if (reader.pos - start) as i64 != length {
        return Err(corrupt(format!(
            "Invalid record size: expected to read {length} bytes in record payload, but instead \
             read {}",
            reader.pos - start
        )));
    }
    Ok(RecordFields {
        // int64 arithmetic, as in default_records.pyx.
        offset: batch.base_offset.wrapping_add(offset_delta),
        key,
        value,
        // Log-append time: the batch's max timestamp stands for every record.
        timestamp_ms: if batch.attributes & TIMESTAMP_TYPE_MASK != 0 {
            batch.max_timestamp
        } else {
            batch.first_timestamp.wrapping_add(timestamp_delta)
        },
        timestamp_type: if batch.attributes & TIMESTAMP_TYPE_MASK != 0 { 2 } else { 1 },
    })
}

/// The sidecar's flow-control size of a record (sidecar/inflight.py `_pending`): header keys
/// count in characters, as Python's len() of a str.
fn flow_control_size(record: &RecordFields<'_>, headers: &[(&str, Option<&[u8]>)]) -> u64 {
    let len = |b: Option<&[u8]>| b.map_or(0, <[u8]>::len) as u64;
    len(record.key)
        + len(record.value)
        + headers.iter().map(|&(k, v)| k.chars().count() as u64 + len(v)).sum::<u64>()
}

/// The v2 batch header (default_records.pyx `_read_header`).
#[derive(Debug)]
struct Header {
    base_offset: i64,
    crc: u32,
    attributes: i16,
    last_offset_delta: i32,
    first_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    records_count: i32,
}

impl Header {
    fn parse(batch: &[u8]) -> Result<Self, Error> {
        if batch.len() < HEADER_LEN {
            return Err(corrupt(format!(
                "Record batch of {} bytes is shorter than its {HEADER_LEN}-byte header",
                batch.len()
            )));
        }
        Ok(Header {
            base_offset: be_i64(batch, 0),
            crc: be_i32(batch, CRC_OFFSET) as u32,
            attributes: i16::from_be_bytes([batch[21], batch[22]]),
            last_offset_delta: be_i32(batch, 23),
            first_timestamp: be_i64(batch, 27),
            max_timestamp: be_i64(batch, 35),
            producer_id: be_i64(batch, 43),
            // producer epoch (51..53) and base sequence (53..57) are not needed.
            records_count: be_i32(batch, 57),
        })
    }

    fn codec(&self) -> u8 {
        (self.attributes & CODEC_MASK) as u8
    }

    fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_MASK != 0
    }

    fn is_control(&self) -> bool {
        self.attributes & CONTROL_MASK != 0
    }

    /// base_offset + last_offset_delta + 1 (Python ints in aiokafka: no wrapping).
    fn next_offset(&self) -> Result<i64, Error> {
        self.base_offset
            .checked_add(i64::from(self.last_offset_delta) + 1)
            .ok_or_else(|| corrupt("Record batch offsets overflow int64"))
    }
}

/// Reads Kafka's zigzag varints and length-prefixed bytes, bounds-checked.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    fn rest(&self) -> &'a [u8] {
        &self.data[self.pos..]
    }

    /// cutil.pyx `decode_varint64`: at most ten bytes, bits past 64 dropped, zigzag-decoded.
    fn varint(&mut self) -> Result<i64, Error> {
        let mut value = 0u64;
        let mut shift = 0;
        loop {
            let byte = *self.data.get(self.pos).ok_or_else(|| corrupt("Varint past the end"))?;
            self.pos += 1;
            if byte & 0x80 == 0 {
                value |= u64::from(byte) << shift;
                break;
            }
            value |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if shift > 63 {
                return Err(corrupt("Out of double range"));
            }
        }
        Ok((value >> 1) as i64 ^ -((value & 1) as i64))
    }

    /// A varint length, then that many bytes; a negative length is null.
    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, Error> {
        let Ok(len) = usize::try_from(self.varint()?) else {
            return Ok(None);
        };
        let bytes = self
            .rest()
            .get(..len)
            .ok_or_else(|| corrupt(format!("Can't read {len} bytes from pos {}", self.pos)))?;
        self.pos += len;
        Ok(Some(bytes))
    }
}

fn corrupt(message: impl Into<String>) -> Error {
    Error::Corrupt(message.into())
}

fn be_i32(data: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

fn be_i64(data: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(data[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests;
