//! Decompression of a v2 batch's records section, as aiokafka's `aiokafka/codec.py` does it.

use std::io::Read;

pub const NONE: u8 = 0;
pub const GZIP: u8 = 1;
pub const SNAPPY: u8 = 2;
pub const LZ4: u8 = 3;
pub const ZSTD: u8 = 4;

/// The header snappy-java's `SnappyOutputStream` (Kafka's Java producer) writes: marker byte
/// -126, "SNAPPY", a NUL, version 1 and compatible version 1 as big-endian int32s
/// (aiokafka/codec.py `_XERIAL_V1_HEADER`).
const XERIAL_HEADER: [u8; 16] =
    [0x82, b'S', b'N', b'A', b'P', b'P', b'Y', 0, 0, 0, 0, 1, 0, 0, 0, 1];

pub fn decompress(codec: u8, data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(2));
    match codec {
        // Python's gzip module reads every member of a multi-member stream: so does this.
        GZIP => flate2::read::MultiGzDecoder::new(data)
            .read_to_end(&mut out)
            .map(drop)
            .map_err(|e| format!("gzip: {e}")),
        SNAPPY => snappy(data, &mut out),
        LZ4 => lz4(data, &mut out),
        ZSTD => zstd::stream::read::Decoder::with_buffer(data)
            .and_then(|mut decoder| decoder.read_to_end(&mut out))
            .map(drop)
            .map_err(|e| format!("zstd: {e}")),
        other => Err(format!("Unknown compression codec {other:#04x}")),
    }?;
    Ok(out)
}

/// The LZ4 frame format (KIP-57), every frame of it, as cramjam.lz4.decompress reads it
/// (lz4_flex's decoder stops after the first frame).
fn lz4(data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut rest = data;
    loop {
        let before = rest.len();
        lz4_flex::frame::FrameDecoder::new(&mut rest)
            .read_to_end(out)
            .map_err(|e| format!("lz4: {e}"))?;
        if rest.is_empty() {
            return Ok(());
        }
        if rest.len() == before {
            return Err("lz4: trailing bytes after the last frame".to_owned());
        }
    }
}

/// aiokafka/codec.py `snappy_decode`: xerial-framed blocks (`!i` length + raw snappy) when the
/// payload is longer than 16 bytes and starts with the xerial v1 header, else one raw block.
fn snappy(data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut decoder = snap::raw::Decoder::new();
    let mut block = |bytes: &[u8], out: &mut Vec<u8>| -> Result<(), String> {
        let len = snap::raw::decompress_len(bytes).map_err(|e| format!("snappy: {e}"))?;
        let start = out.len();
        out.resize(start + len, 0);
        let written =
            decoder.decompress(bytes, &mut out[start..]).map_err(|e| format!("snappy: {e}"))?;
        out.truncate(start + written);
        Ok(())
    };
    if data.len() > XERIAL_HEADER.len() && data.starts_with(&XERIAL_HEADER) {
        let mut rest = &data[XERIAL_HEADER.len()..];
        while !rest.is_empty() {
            let (size, tail) =
                rest.split_first_chunk::<4>().ok_or("snappy: truncated xerial block length")?;
            let size = usize::try_from(i32::from_be_bytes(*size))
                .ok()
                .filter(|&size| size <= tail.len())
                .ok_or("snappy: xerial block length out of range")?;
            block(&tail[..size], out)?;
            rest = &tail[size..];
        }
        Ok(())
    } else {
        block(data, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const TEXT: &[u8] = b"the quick brown fox jumps over the lazy dog; the quick brown fox";

    #[test]
    fn none_and_unknown_codecs() {
        assert!(decompress(5, b"x").unwrap_err().contains("Unknown compression codec 0x05"));
        assert!(decompress(NONE, b"x").is_err(), "callers never decompress codec 0");
    }

    #[test]
    fn gzip_multi_member() {
        let mut both = Vec::new();
        for part in [&TEXT[..10], &TEXT[10..]] {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            encoder.write_all(part).unwrap();
            both.extend(encoder.finish().unwrap());
        }
        assert_eq!(decompress(GZIP, &both).unwrap(), TEXT);
        assert!(decompress(GZIP, &both[..both.len() - 3]).is_err());
    }

    #[test]
    fn snappy_raw_and_xerial() {
        let raw = snap::raw::Encoder::new().compress_vec(TEXT).unwrap();
        assert_eq!(decompress(SNAPPY, &raw).unwrap(), TEXT);
        let mut xerial = XERIAL_HEADER.to_vec();
        for chunk in TEXT.chunks(20) {
            let block = snap::raw::Encoder::new().compress_vec(chunk).unwrap();
            xerial.extend((block.len() as i32).to_be_bytes());
            xerial.extend(block);
        }
        assert_eq!(decompress(SNAPPY, &xerial).unwrap(), TEXT);
        // A block length past the end, negative, or cut short.
        let mut bad = XERIAL_HEADER.to_vec();
        bad.extend(1000i32.to_be_bytes());
        bad.push(0);
        assert!(decompress(SNAPPY, &bad).is_err());
        let mut bad = XERIAL_HEADER.to_vec();
        bad.extend((-4i32).to_be_bytes());
        assert!(decompress(SNAPPY, &bad).is_err());
        let mut bad = XERIAL_HEADER.to_vec();
        bad.extend([0, 0]);
        assert!(decompress(SNAPPY, &bad).is_err());
    }

    #[test]
    fn lz4_frames() {
        let mut encoder = lz4_flex::frame::FrameEncoder::new(Vec::new());
        encoder.write_all(TEXT).unwrap();
        let frame = encoder.finish().unwrap();
        assert_eq!(decompress(LZ4, &frame).unwrap(), TEXT);
        // Frames back to back, as cramjam reads them.
        let both = [&frame[..], &frame[..]].concat();
        assert_eq!(decompress(LZ4, &both).unwrap(), [TEXT, TEXT].concat());
        assert!(decompress(LZ4, &[&frame[..], b"xy"].concat()).is_err());
        // Cut inside a block.
        assert!(decompress(LZ4, &frame[..frame.len() - 10]).is_err());
        // Cut inside the 4-byte end mark only: lz4_flex returns the (complete) data where
        // cramjam fails. Only reachable with check_crcs off: the batch CRC covers the bytes.
        for cut in 1..=4 {
            assert_eq!(decompress(LZ4, &frame[..frame.len() - cut]).unwrap(), TEXT, "{cut}");
        }
        assert!(decompress(LZ4, TEXT).is_err());
    }

    #[test]
    fn zstd_frames_concatenated() {
        let mut both = zstd::bulk::compress(&TEXT[..5], 3).unwrap();
        both.extend(zstd::bulk::compress(&TEXT[5..], 3).unwrap());
        assert_eq!(decompress(ZSTD, &both).unwrap(), TEXT);
        assert!(decompress(ZSTD, &both[..both.len() - 1]).is_err());
    }
}
