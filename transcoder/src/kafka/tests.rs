use std::io::Write;

use super::*;

fn s(bytes: &[u8]) -> Option<&[u8]> {
    Some(bytes)
}

type Headers<'a> = &'a [(&'a str, Option<&'a [u8]>)];

/// One record to put in a test batch: offset delta, timestamp delta, key, value, headers.
struct Rec<'a>(i64, i64, Option<&'a [u8]>, Option<&'a [u8]>, Headers<'a>);

fn zigzag(out: &mut Vec<u8>, v: i64) {
    proto::put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn nullable(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(b) => {
            zigzag(out, b.len() as i64);
            out.extend_from_slice(b);
        }
        None => zigzag(out, -1),
    }
}

fn encode_records(records: &[Rec<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for Rec(offset_delta, ts_delta, key, value, headers) in records {
        let mut body = vec![0u8]; // attributes
        zigzag(&mut body, *ts_delta);
        zigzag(&mut body, *offset_delta);
        nullable(&mut body, *key);
        nullable(&mut body, *value);
        zigzag(&mut body, headers.len() as i64);
        for (k, v) in headers.iter() {
            nullable(&mut body, Some(k.as_bytes()));
            nullable(&mut body, *v);
        }
        zigzag(&mut out, body.len() as i64);
        out.extend(body);
    }
    out
}

#[derive(Clone, Copy)]
struct BatchSpec {
    base_offset: i64,
    attributes: i16,
    last_offset_delta: i32,
    first_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    count: i32,
}

impl Default for BatchSpec {
    fn default() -> Self {
        BatchSpec {
            base_offset: 0,
            attributes: 0,
            last_offset_delta: -1,
            first_timestamp: 1_000,
            max_timestamp: 9_000,
            producer_id: -1,
            count: -1,
        }
    }
}

/// A v2 batch around an already encoded (maybe compressed) records section.
fn batch_of(spec: BatchSpec, count: i32, last_delta: i32, section: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(spec.base_offset.to_be_bytes());
    out.extend(((HEADER_LEN - LOG_OVERHEAD + section.len()) as i32).to_be_bytes());
    out.extend((-1i32).to_be_bytes()); // partition leader epoch
    out.push(2);
    out.extend([0; 4]); // crc, below
    out.extend(spec.attributes.to_be_bytes());
    let last = if spec.last_offset_delta >= 0 { spec.last_offset_delta } else { last_delta };
    out.extend(last.to_be_bytes());
    out.extend(spec.first_timestamp.to_be_bytes());
    out.extend(spec.max_timestamp.to_be_bytes());
    out.extend(spec.producer_id.to_be_bytes());
    out.extend(0i16.to_be_bytes());
    out.extend(0i32.to_be_bytes());
    out.extend((if spec.count >= 0 { spec.count } else { count }).to_be_bytes());
    out.extend_from_slice(section);
    let crc = crc32c::crc32c(&out[ATTRIBUTES_OFFSET..]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    out
}

fn batch(spec: BatchSpec, records: &[Rec<'_>]) -> Vec<u8> {
    let last = records.iter().map(|r| r.0).max().unwrap_or(0) as i32;
    batch_of(spec, records.len() as i32, last, &encode_records(records))
}

fn compressed(spec: BatchSpec, codec: u8, records: &[Rec<'_>]) -> Vec<u8> {
    let raw = encode_records(records);
    let section = match codec {
        codec::GZIP => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            e.write_all(&raw).unwrap();
            e.finish().unwrap()
        }
        codec::SNAPPY => snap::raw::Encoder::new().compress_vec(&raw).unwrap(),
        codec::LZ4 => {
            let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
            e.write_all(&raw).unwrap();
            e.finish().unwrap()
        }
        codec::ZSTD => zstd::bulk::compress(&raw, 3).unwrap(),
        _ => unreachable!(),
    };
    let last = records.iter().map(|r| r.0).max().unwrap_or(0) as i32;
    let spec = BatchSpec { attributes: spec.attributes | i16::from(codec), ..spec };
    batch_of(spec, records.len() as i32, last, &section)
}

fn control(base_offset: i64, producer_id: i64, abort: bool) -> Vec<u8> {
    let key: &[u8] = if abort { b"\0\0\0\0" } else { b"\0\0\0\x01" };
    let spec = BatchSpec {
        base_offset,
        producer_id,
        attributes: TRANSACTIONAL_MASK | CONTROL_MASK,
        ..BatchSpec::default()
    };
    batch(spec, &[Rec(0, 0, Some(key), s(b"\0\0\0\0\0\0"), &[])])
}

fn txn(base_offset: i64, producer_id: i64, n: i64) -> Vec<u8> {
    let records: Vec<Rec<'_>> = (0..n).map(|i| Rec(i, 0, None, s(b"t"), &[])).collect();
    let spec = BatchSpec {
        base_offset,
        producer_id,
        attributes: TRANSACTIONAL_MASK,
        ..Default::default()
    };
    batch(spec, &records)
}

fn fetch(aborted: Option<&[(i64, i64)]>) -> Fetch<'_> {
    Fetch { topic: "t", partition: 3, fetch_offset: 0, aborted, check_crcs: true, keys: false }
}

fn run(data: &[u8], fetch: &Fetch<'_>) -> Transcoded {
    let (out, error) = transcode(data, fetch);
    assert_eq!(error, None);
    out
}

fn corrupt_message(data: &[u8], fetch: &Fetch<'_>) -> String {
    match transcode(data, fetch).1 {
        Some(Error::Corrupt(message)) => message,
        other => panic!("expected a corrupt-record error, got {other:?}"),
    }
}

#[test]
fn one_batch_to_records() {
    let data = batch(
        BatchSpec { base_offset: 100, ..Default::default() },
        &[
            Rec(0, 0, s(b"k"), s(b"v"), &[("h", s(b"1")), ("h", None), ("é", s(b""))]),
            Rec(1, 5, None, None, &[]),
        ],
    );
    let out = run(&data, &fetch(None));
    assert_eq!(out.offsets, [100, 101]);
    assert_eq!(out.next_offset, 102);
    assert_eq!(out.batches, 1);
    // "é" is one character (two bytes).
    assert_eq!(out.sizes, [1 + 1 + (1 + 1) + 1 + 1, 0]);
    let prefix = proto::record_prefix("t", 3);
    let mut expected = Vec::new();
    let first = RecordFields {
        offset: 100,
        key: s(b"k"),
        value: s(b"v"),
        timestamp_ms: 1_000,
        timestamp_type: 1,
    };
    proto::put_record(
        &mut expected,
        &prefix,
        &first,
        &[("h", s(b"1")), ("h", None), ("é", s(b""))],
    );
    assert_eq!(out.ends[0], expected.len());
    let second = RecordFields {
        offset: 101,
        key: None,
        value: None,
        timestamp_ms: 1_005,
        timestamp_type: 1,
    };
    proto::put_record(&mut expected, &prefix, &second, &[]);
    assert_eq!(out.wire, expected);
    assert_eq!(out.ends, [out.ends[0], expected.len()]);
}

#[test]
fn log_append_time_gives_every_record_the_max_timestamp() {
    let spec = BatchSpec { attributes: TIMESTAMP_TYPE_MASK, ..Default::default() };
    let data = batch(spec, &[Rec(0, 1, None, s(b"a"), &[]), Rec(1, 7, None, s(b"b"), &[])]);
    let out = run(&data, &fetch(None));
    let mut expected = Vec::new();
    for offset in [0, 1] {
        let value: &[u8] = if offset == 0 { b"a" } else { b"b" };
        let fields = RecordFields {
            offset,
            key: None,
            value: Some(value),
            timestamp_ms: 9_000,
            timestamp_type: 2,
        };
        proto::put_record(&mut expected, &proto::record_prefix("t", 3), &fields, &[]);
    }
    assert_eq!(out.wire, expected);
}

#[test]
fn records_below_the_fetch_offset_are_skipped_but_still_checked() {
    let records: Vec<Rec<'_>> = (0..5).map(|i| Rec(i, 0, None, s(b"x"), &[])).collect();
    let data = batch(BatchSpec { base_offset: 10, ..Default::default() }, &records);
    let out = run(&data, &Fetch { fetch_offset: 13, ..fetch(None) });
    assert_eq!(out.offsets, [13, 14]);
    assert_eq!(out.next_offset, 15);
    // A fetch offset past the batch: nothing, and the position moves past the batch.
    let out = run(&data, &Fetch { fetch_offset: 99, ..fetch(None) });
    assert!(out.offsets.is_empty());
    assert_eq!(out.next_offset, 15);
}

#[test]
fn next_offset_follows_last_offset_delta_after_compaction() {
    // Records 0 and 2 of a batch whose last offset delta is 5 (compacted away).
    let spec = BatchSpec { base_offset: 20, last_offset_delta: 5, ..Default::default() };
    let data = batch(spec, &[Rec(0, 0, None, None, &[]), Rec(2, 0, None, None, &[])]);
    let out = run(&data, &fetch(None));
    assert_eq!(out.offsets, [20, 22]);
    assert_eq!(out.next_offset, 26);
}

#[test]
fn truncated_trailing_batches_are_left_for_the_next_fetch() {
    let first = batch(BatchSpec::default(), &[Rec(0, 0, None, s(b"a"), &[])]);
    let second =
        batch(BatchSpec { base_offset: 1, ..Default::default() }, &[Rec(0, 0, None, None, &[])]);
    for cut in [0, 1, 11, 12, 30, second.len() - 1] {
        let mut data = first.clone();
        data.extend_from_slice(&second[..cut]);
        let out = run(&data, &fetch(None));
        assert_eq!((out.offsets.as_slice(), out.next_offset, out.batches), (&[0][..], 1, 1));
    }
    let out = run(&second[..20], &Fetch { fetch_offset: 7, ..fetch(None) });
    assert_eq!((out.batches, out.next_offset), (0, 7));
    assert_eq!(run(&[], &fetch(None)).batches, 0);
}

#[test]
fn a_length_below_the_minimum_is_corrupt() {
    let mut data = vec![0; 12];
    data[8..12].copy_from_slice(&13i32.to_be_bytes());
    data.extend([0; 13]);
    assert!(corrupt_message(&data, &fetch(None)).contains("minimum record overhead"));
    data[8..12].copy_from_slice(&(-1i32).to_be_bytes());
    assert!(corrupt_message(&data, &fetch(None)).contains("minimum record overhead"));
    // Long enough to frame, too short for a v2 header.
    let mut data = vec![0; 12];
    data[8..12].copy_from_slice(&20i32.to_be_bytes());
    data.extend([0; 20]);
    data[MAGIC_OFFSET] = 2;
    assert!(corrupt_message(&data, &fetch(None)).contains("shorter than its 61-byte header"));
}

#[test]
fn a_bad_crc_is_corrupt_after_the_good_batches() {
    let good = batch(BatchSpec::default(), &[Rec(0, 0, None, s(b"a"), &[])]);
    let mut bad =
        batch(BatchSpec { base_offset: 1, ..Default::default() }, &[Rec(0, 0, None, s(b"b"), &[])]);
    let value_byte = bad.len() - 2;
    bad[value_byte] ^= 1;
    let data = [good, bad].concat();
    let (partial, error) = transcode(&data, &fetch(None));
    assert_eq!(
        error,
        Some(Error::Corrupt("Invalid CRC - TopicPartition(topic='t', partition=3)".into()))
    );
    assert_eq!(
        (partial.offsets.as_slice(), partial.next_offset, partial.batches),
        (&[0][..], 1, 1)
    );
    // Unchecked, the flipped byte is just a different value.
    let out = run(&data, &Fetch { check_crcs: false, ..fetch(None) });
    assert_eq!(out.offsets, [0, 1]);
}

#[test]
fn control_batches_are_skipped_under_either_isolation_level() {
    let data = [txn(0, 7, 2), control(2, 7, false), txn(3, 7, 1)].concat();
    for aborted in [None, Some(&[][..])] {
        let out = run(&data, &fetch(aborted));
        assert_eq!(out.offsets, [0, 1, 3]);
        assert_eq!(out.next_offset, 4);
        assert_eq!(out.batches, 3);
    }
    // Only a control batch: nothing delivered, the position still moves past it.
    let out = run(&control(5, 7, true), &Fetch { fetch_offset: 5, ..fetch(Some(&[])) });
    assert_eq!((out.offsets.len(), out.next_offset), (0, 6));
}

#[test]
fn aborted_transactions_are_skipped_under_read_committed() {
    // Producer 7 aborts a transaction at 0..2 and commits 4..5; producer 8 commits at 2..3;
    // plain (non-transactional) records at 7.
    let data = [
        txn(0, 7, 2),
        txn(2, 8, 1),
        control(3, 7, true),
        txn(4, 7, 2),
        control(6, 7, false),
        batch(BatchSpec { base_offset: 7, ..Default::default() }, &[Rec(0, 0, None, None, &[])]),
        control(8, 8, false),
    ]
    .concat();
    let aborted: &[(i64, i64)] = &[(7, 0)];
    let out = run(&data, &fetch(Some(aborted)));
    assert_eq!(out.offsets, [2, 4, 5, 7]);
    assert_eq!(out.next_offset, 9);
    // read_uncommitted delivers the aborted records too.
    let out = run(&data, &fetch(None));
    assert_eq!(out.offsets, [0, 1, 2, 4, 5, 7]);
    // An abort with no matching marker in this fetch keeps skipping that producer's batches.
    let out = run(&txn(0, 7, 3), &fetch(Some(&[(7, 0)])));
    assert_eq!((out.offsets.len(), out.next_offset), (0, 3));
    // An aborted transaction that starts after the batch does not apply to it yet.
    let out = run(&txn(0, 7, 3), &fetch(Some(&[(7, 3)])));
    assert_eq!(out.offsets, [0, 1, 2]);
    // The list's order does not matter: aiokafka sorts it by first offset.
    let two = [txn(0, 7, 1), control(1, 7, true), txn(2, 7, 1)].concat();
    let out = run(&two, &fetch(Some(&[(7, 2), (7, 0)])));
    assert_eq!((out.offsets.len(), out.next_offset), (0, 3));
}

#[test]
fn malformed_control_batches_are_corrupt_under_read_committed_only() {
    let spec = BatchSpec { attributes: CONTROL_MASK | TRANSACTIONAL_MASK, ..Default::default() };
    let cases: [(Vec<u8>, &str); 3] = [
        (batch(spec, &[]), "did not contain any records"),
        (batch(spec, &[Rec(0, 0, None, None, &[])]), "without a key"),
        (batch(spec, &[Rec(0, 0, s(b"\0\0\0"), None, &[])]), "shorter than 4 bytes"),
    ];
    for (data, message) in cases {
        assert!(corrupt_message(&data, &fetch(Some(&[]))).contains(message), "{message}");
        assert_eq!(run(&data, &fetch(None)).next_offset, 1);
    }
}

#[test]
fn every_codec() {
    let value = [b'z'; 3000];
    let records =
        [Rec(0, 0, s(b"k"), Some(&value[..]), &[("a", None)]), Rec(1, 1, None, s(b"tail"), &[])];
    let plain = run(&batch(BatchSpec::default(), &records), &fetch(None));
    for codec in [codec::GZIP, codec::SNAPPY, codec::LZ4, codec::ZSTD] {
        let data = compressed(BatchSpec::default(), codec, &records);
        assert!(data.len() < 1000, "codec {codec} compressed");
        assert_eq!(run(&data, &fetch(None)), plain, "codec {codec}");
        let mut broken = data.clone();
        broken.truncate(broken.len() - 12);
        let length = (broken.len() - LOG_OVERHEAD) as i32;
        broken[8..12].copy_from_slice(&length.to_be_bytes());
        let message = corrupt_message(&broken, &Fetch { check_crcs: false, ..fetch(None) });
        assert!(!message.is_empty());
    }
    let unknown = BatchSpec { attributes: 5, ..Default::default() };
    let message = corrupt_message(&batch(unknown, &records), &fetch(None));
    assert!(message.contains("Unknown compression codec 0x05"), "{message}");
}

#[test]
fn legacy_and_unknown_magic() {
    let mut data =
        batch(BatchSpec { base_offset: 4, ..Default::default() }, &[Rec(0, 0, None, None, &[])]);
    for magic in [0, 1] {
        data[MAGIC_OFFSET] = magic;
        assert_eq!(transcode(&data, &fetch(None)).1, Some(Error::Legacy { magic, offset: 4 }));
    }
    data[MAGIC_OFFSET] = 3;
    assert!(corrupt_message(&data, &fetch(None)).contains("magic 3"));
}

#[test]
fn malformed_records_are_corrupt() {
    let base = encode_records(&[Rec(0, 0, s(b"k"), s(b"v"), &[("h", s(b"x"))])]);
    let check = |section: &[u8], count: i32, expected: &str| {
        let data = batch_of(BatchSpec::default(), count, 0, section);
        let message = corrupt_message(&data, &fetch(None));
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    };
    // More bytes than the records use.
    check(&[&base[..], &[0][..]].concat(), 1, "1 unconsumed bytes");
    // More records announced than there are.
    check(&base, 2, "Varint past the end");
    // A record length that disagrees with the fields.
    let mut wrong_length = base.clone();
    wrong_length[0] += 2;
    check(&[&wrong_length[..], &[0, 0][..]].concat(), 1, "Invalid record size");
    // A key longer than the batch.
    let mut body = vec![0u8, 0, 0];
    zigzag(&mut body, 100);
    let mut section = Vec::new();
    zigzag(&mut section, body.len() as i64);
    section.extend(&body);
    check(&section, 1, "Can't read 100 bytes");
    // Negative header count, negative header key length, header key not UTF-8.
    for (headers, expected) in [
        (&[0x01][..], "invalid number of record headers -1"),
        (&[0x02, 0x01][..], "Invalid negative header key size"),
        (&[0x02, 0x02, 0xff, 0x01][..], "not UTF-8"),
    ] {
        let mut body = vec![0u8, 0, 0, 0x01, 0x01];
        body.extend(headers);
        let mut section = Vec::new();
        zigzag(&mut section, body.len() as i64);
        section.extend(&body);
        check(&section, 1, expected);
    }
}

#[test]
fn varints_decode_like_aiokafka() {
    let decode = |bytes: &[u8]| Reader::new(bytes).varint();
    assert_eq!(decode(&[0x00]), Ok(0));
    assert_eq!(decode(&[0x01]), Ok(-1));
    assert_eq!(decode(&[0x02]), Ok(1));
    assert_eq!(decode(&[0xac, 0x02]), Ok(150));
    for v in [i64::MIN, i64::MIN + 1, -300, 0, 300, i64::MAX] {
        let mut buf = Vec::new();
        zigzag(&mut buf, v);
        assert_eq!(decode(&buf), Ok(v));
    }
    // Ten bytes at most; an eleventh is an error, as is running out of bytes.
    assert_eq!(decode(&[0xff; 9].iter().chain(&[0x01]).copied().collect::<Vec<_>>()), Ok(i64::MIN));
    assert!(decode(&[0xff; 11]).is_err());
    assert!(decode(&[0x80]).is_err());
    assert!(decode(&[]).is_err());
    // A null (negative length) is None.
    assert_eq!(Reader::new(&[0x01]).nullable_bytes(), Ok(None));
    assert_eq!(Reader::new(&[0x03]).nullable_bytes(), Ok(None));
    assert_eq!(Reader::new(&[0x00]).nullable_bytes(), Ok(Some(&b""[..])));
}
