//! TFRecord framing, as TensorFlow's `record_writer.cc` writes it: each record is its length
//! (u64, little-endian), the masked CRC32C of those 8 bytes, the data, and the masked CRC32C of
//! the data (both checksums u32, little-endian).

use std::path::Path;

use crate::{EventError, Result};

/// Bytes a record needs before its data: the length and the length's checksum.
const HEAD: usize = 12;

/// CRC32C of `data`, masked as TFRecord requires (rotated right by 15, plus a constant), so that
/// a checksum stored inside checksummed data does not confuse a reader.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one record.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + HEAD + 4);
    record.extend_from_slice(&len);
    record.extend_from_slice(&masked_crc(&len).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc(data).to_le_bytes());
    record
}

/// The data of each record of `bytes` (the contents of the file `path`, named in errors) with
/// the byte where its record starts, checking both checksums of every record. A record cut short
/// at the end (a writer killed mid-write, or a file still being written) ends the file; a wrong
/// checksum is an error.
pub fn unframe<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<(usize, &'a [u8])>> {
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let bad = |offset: usize, why: &str| EventError::BadRecord { path: path.into(), offset, why: why.into() };
    let mut records = Vec::new();
    let mut at = 0;
    // Nothing is known of a record before its length and the length's checksum.
    while at + HEAD <= bytes.len() {
        let len_bytes: [u8; 8] = bytes[at..at + 8].try_into().expect("8 bytes");
        if word(at + 8) != masked_crc(&len_bytes) {
            return Err(bad(at, "has a wrong length checksum: not a TensorBoard event file, or a damaged one"));
        }
        // A length past the end (even past usize) is a record cut short.
        let Some(end) = usize::try_from(u64::from_le_bytes(len_bytes)).ok().and_then(|l| (at + HEAD).checked_add(l))
        else {
            break;
        };
        if end.checked_add(4).is_none_or(|e| e > bytes.len()) {
            break;
        }
        let data = &bytes[at + HEAD..end];
        if word(end) != masked_crc(data) {
            return Err(bad(at, "has a wrong data checksum: the file is damaged"));
        }
        records.push((at, data));
        at = end + 4;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC32C of "123456789" is 0xE3069283 (the standard check value); TFRecord masks it as
        // rotate-right-15 plus 0xa282ead8. Worked by hand: 0xE3069283 rotated right by 15 is
        // 0x2507C60D; plus 0xa282ead8 is 0xC78AB0E5 (mod 2^32).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn frames_unframe_back_and_damage_is_caught() {
        let path = Path::new("events.out.tfevents.test");
        let mut bytes = frame(b"first");
        bytes.extend(frame(b""));
        bytes.extend(frame(b"third record"));
        // The layout by hand: 8 + 4 + 5 + 4 bytes for the first record.
        assert_eq!(&bytes[..8], &5u64.to_le_bytes());
        assert_eq!(&bytes[12..17], b"first");
        assert_eq!(bytes.len(), 3 * 16 + 5 + 12);
        let got = unframe(path, &bytes).unwrap();
        assert_eq!(got, vec![(0, &b"first"[..]), (21, &b""[..]), (37, &b"third record"[..])]);

        // Cut anywhere inside the last record: the first two remain.
        for cut in 37..bytes.len() {
            assert_eq!(unframe(path, &bytes[..cut]).unwrap().len(), 2, "cut at {cut}");
        }
        // A length that would run past the end of memory is a record cut short, not a panic.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&masked_crc(&u64::MAX.to_le_bytes()).to_le_bytes());
        assert!(unframe(path, &huge).unwrap().is_empty());

        // Any one bit flipped in the first record (length, its checksum, data, data checksum) is
        // an error naming the file and the record.
        for i in 0..21 {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            let err = unframe(path, &bad).unwrap_err().to_string();
            assert!(
                err.contains("events.out.tfevents.test") && err.contains("at byte 0") && err.contains("checksum"),
                "{i}: {err}"
            );
        }
    }
}
