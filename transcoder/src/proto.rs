//! Protobuf wire encoding of `kafkasidecar.v1.Record`, `Header`, `Batch` and the `batch` arm of
//! `ConsumeResponse` (proto/kafkasidecar/v1/consumer.proto), written by hand.
//!
//! Fields go out in field-number order with proto3's presence rules, exactly as the Python
//! protobuf runtime serializes the messages `sidecar/wire.py` builds: a scalar equal to zero
//! and an empty string are left out; `optional bytes` (key, value, header value) is written
//! whenever it is set, even empty. A record's bytes stop before `delivery_attempt` (field 9,
//! the last one), so appending that field gives the bytes the runtime would have produced.

/// Field tags: `field_number << 3 | wire_type` (0 = varint, 2 = length-delimited).
pub mod tag {
    pub const RECORD_TOPIC: u8 = 1 << 3 | 2;
    pub const RECORD_PARTITION: u8 = 2 << 3;
    pub const RECORD_OFFSET: u8 = 3 << 3;
    pub const RECORD_KEY: u8 = 4 << 3 | 2;
    pub const RECORD_VALUE: u8 = 5 << 3 | 2;
    pub const RECORD_HEADERS: u8 = 6 << 3 | 2;
    pub const RECORD_TIMESTAMP_MS: u8 = 7 << 3;
    pub const RECORD_TIMESTAMP_TYPE: u8 = 8 << 3;
    pub const RECORD_DELIVERY_ATTEMPT: u8 = 9 << 3;
    pub const HEADER_KEY: u8 = 1 << 3 | 2;
    pub const HEADER_VALUE: u8 = 2 << 3 | 2;
    pub const BATCH_ID: u8 = 1 << 3;
    pub const BATCH_RECORDS: u8 = 2 << 3 | 2;
    pub const RESPONSE_BATCH: u8 = 2 << 3 | 2;
}

/// Bytes of `v` as a base-128 varint (1 to 10).
pub const fn varint_len(v: u64) -> usize {
    // 1 + floor(bits / 7), with 0 taking one byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// An int32/int64/enum field; negative values are sign-extended to 64 bits (ten bytes), as
/// protobuf does. Left out when zero.
pub fn put_int(out: &mut Vec<u8>, tag: u8, v: i64) {
    if v != 0 {
        out.push(tag);
        put_varint(out, v as u64);
    }
}

/// A length-delimited field (bytes, string, sub-message).
pub fn put_len_delimited(out: &mut Vec<u8>, tag: u8, data: &[u8]) {
    out.push(tag);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// Encoded size of a length-delimited field holding `len` bytes.
pub const fn len_delimited_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// What a `Record` holds apart from topic and partition, borrowed from the Kafka batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordFields<'a> {
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub timestamp_ms: i64,
    /// The proto enum value: aiokafka's timestamp_type + 1.
    pub timestamp_type: i32,
}

/// The leading `topic` and `partition` fields, the same for every record of a fetch.
pub fn record_prefix(topic: &str, partition: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + 16);
    if !topic.is_empty() {
        put_len_delimited(&mut out, tag::RECORD_TOPIC, topic.as_bytes());
    }
    put_int(&mut out, tag::RECORD_PARTITION, partition.into());
    out
}

/// Appends one `Record` (without `delivery_attempt`, not length-prefixed) to `out`.
pub fn put_record(
    out: &mut Vec<u8>,
    prefix: &[u8],
    record: &RecordFields<'_>,
    headers: &[(&str, Option<&[u8]>)],
) {
    out.extend_from_slice(prefix);
    put_int(out, tag::RECORD_OFFSET, record.offset);
    if let Some(key) = record.key {
        put_len_delimited(out, tag::RECORD_KEY, key);
    }
    if let Some(value) = record.value {
        put_len_delimited(out, tag::RECORD_VALUE, value);
    }
    for &(key, value) in headers {
        let key_len = if key.is_empty() { 0 } else { len_delimited_len(key.len()) };
        let value_len = value.map_or(0, |v| len_delimited_len(v.len()));
        out.push(tag::RECORD_HEADERS);
        put_varint(out, (key_len + value_len) as u64);
        if !key.is_empty() {
            put_len_delimited(out, tag::HEADER_KEY, key.as_bytes());
        }
        if let Some(value) = value {
            put_len_delimited(out, tag::HEADER_VALUE, value);
        }
    }
    put_int(out, tag::RECORD_TIMESTAMP_MS, record.timestamp_ms);
    put_int(out, tag::RECORD_TIMESTAMP_TYPE, record.timestamp_type.into());
}

/// Encoded size of the `delivery_attempt` field (0 when the value is 0: left out).
pub const fn delivery_attempt_len(attempt: u32) -> usize {
    if attempt == 0 {
        0
    } else {
        1 + varint_len(attempt as u64)
    }
}

/// Size of a `Batch` holding `records` (record bytes, delivery_attempt).
pub fn batch_len(batch_id: u64, records: &[(&[u8], u32)]) -> usize {
    let id = if batch_id == 0 { 0 } else { 1 + varint_len(batch_id) };
    id + records
        .iter()
        .map(|(bytes, attempt)| len_delimited_len(bytes.len() + delivery_attempt_len(*attempt)))
        .sum::<usize>()
}

/// Appends a `Batch`: `batch_id`, then each record as field 2 with its `delivery_attempt`
/// appended after the record's other fields.
pub fn put_batch(out: &mut Vec<u8>, batch_id: u64, records: &[(&[u8], u32)]) {
    if batch_id != 0 {
        out.push(tag::BATCH_ID);
        put_varint(out, batch_id);
    }
    for &(bytes, attempt) in records {
        out.push(tag::BATCH_RECORDS);
        put_varint(out, (bytes.len() + delivery_attempt_len(attempt)) as u64);
        out.extend_from_slice(bytes);
        if attempt != 0 {
            out.push(tag::RECORD_DELIVERY_ATTEMPT);
            put_varint(out, attempt.into());
        }
    }
}

/// A `Batch`, or a `ConsumeResponse` whose `batch` it is when `response` is set.
pub fn batch_message(batch_id: u64, records: &[(&[u8], u32)], response: bool) -> Vec<u8> {
    let len = batch_len(batch_id, records);
    let mut out = Vec::with_capacity(if response { len_delimited_len(len) } else { len });
    if response {
        out.push(tag::RESPONSE_BATCH);
        put_varint(&mut out, len as u64);
    }
    put_batch(&mut out, batch_id, records);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_varint(&mut out, v);
        out
    }

    #[test]
    fn varints_match_the_protobuf_spec() {
        assert_eq!(varint(0), [0x00]);
        assert_eq!(varint(1), [0x01]);
        assert_eq!(varint(127), [0x7f]);
        assert_eq!(varint(128), [0x80, 0x01]);
        assert_eq!(varint(150), [0x96, 0x01]);
        assert_eq!(varint(300), [0xac, 0x02]);
        assert_eq!(varint(16_383), [0xff, 0x7f]);
        assert_eq!(varint(16_384), [0x80, 0x80, 0x01]);
        assert_eq!(varint(u64::MAX), [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        // int64 -1 is ten bytes.
        assert_eq!(varint(-1i64 as u64).len(), 10);
    }

    #[test]
    fn varint_len_agrees_with_put_varint() {
        let mut v = 1u64;
        for shift in 0..64 {
            for candidate in [v - 1, v, v + 1, (1u64 << shift) - 1] {
                assert_eq!(varint_len(candidate), varint(candidate).len(), "{candidate}");
            }
            v = v.wrapping_shl(1).max(1);
        }
        assert_eq!(varint_len(u64::MAX), 10);
    }

    #[test]
    fn zero_scalars_and_empty_strings_are_left_out() {
        let mut out = Vec::new();
        let prefix = record_prefix("", 0);
        assert!(prefix.is_empty());
        let fields =
            RecordFields { offset: 0, key: None, value: None, timestamp_ms: 0, timestamp_type: 0 };
        put_record(&mut out, &prefix, &fields, &[("", None)]);
        // Only the header, empty: tag 6, length 0.
        assert_eq!(out, [0x32, 0x00]);
    }

    #[test]
    fn a_full_record() {
        let prefix = record_prefix("t", -1);
        let fields = RecordFields {
            offset: 300,
            key: Some(b""),
            value: Some(b"v"),
            timestamp_ms: 1,
            timestamp_type: 2,
        };
        let mut out = Vec::new();
        put_record(&mut out, &prefix, &fields, &[("h", Some(b"x")), ("h", None)]);
        let mut expected = vec![0x0a, 0x01, b't', 0x10];
        expected.extend(varint(-1i64 as u64));
        expected.extend([0x18, 0xac, 0x02]); // offset 300
        expected.extend([0x22, 0x00]); // empty key, present
        expected.extend([0x2a, 0x01, b'v']);
        expected.extend([0x32, 0x06, 0x0a, 0x01, b'h', 0x12, 0x01, b'x']);
        expected.extend([0x32, 0x03, 0x0a, 0x01, b'h']); // null value: no field 2
        expected.extend([0x38, 0x01, 0x40, 0x02]);
        assert_eq!(out, expected);
    }

    #[test]
    fn batches_append_delivery_attempt_last() {
        let records: [(&[u8], u32); 3] = [(b"\x18\x05", 1), (b"", 0), (b"\x18\x06", 300)];
        let batch = batch_message(7, &records, false);
        assert_eq!(
            batch,
            [
                0x08, 0x07, // batch_id
                0x12, 0x04, 0x18, 0x05, 0x48, 0x01, // record, attempt 1
                0x12, 0x00, // empty record, attempt 0 left out
                0x12, 0x05, 0x18, 0x06, 0x48, 0xac, 0x02, // attempt 300
            ]
        );
        assert_eq!(batch.len(), batch_len(7, &records));
        let response = batch_message(7, &records, true);
        assert_eq!(response[0], 0x12);
        assert_eq!(response[1] as usize, batch.len());
        assert_eq!(&response[2..], &batch[..]);
        assert_eq!(batch_message(0, &[], false), Vec::<u8>::new());
    }
}
