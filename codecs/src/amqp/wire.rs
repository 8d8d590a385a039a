//! Low-level helpers shared by the AMQP encoders and decoders: a bounds-checked
//! read cursor and writers for the length-prefixed string types.
//!
//! Every read goes through [`Reader::take`], which uses checked splitting, so
//! malformed input can only ever produce a [`DecodeError`], never a panic.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::DecodeError;

/// Longest short string the wire format can carry.
pub(crate) const SHORTSTR_MAX: usize = 255;

/// A forward-only cursor over a byte slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Consumes exactly `n` bytes or fails with `Truncated { context }`.
    pub(crate) fn take(
        &mut self,
        n: usize,
        context: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self
            .buf
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated { context })?;
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, context: &'static str) -> Result<[u8; N], DecodeError> {
        self.take(N, context)?
            .try_into()
            .map_err(|_| DecodeError::Truncated { context })
    }

    pub(crate) fn u8(&mut self, context: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(context).map(u8::from_be_bytes)
    }

    pub(crate) fn u16(&mut self, context: &'static str) -> Result<u16, DecodeError> {
        self.array(context).map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self, context: &'static str) -> Result<u32, DecodeError> {
        self.array(context).map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self, context: &'static str) -> Result<u64, DecodeError> {
        self.array(context).map(u64::from_be_bytes)
    }

    /// Reads a `u32` length and then that many bytes.
    pub(crate) fn long_slice(&mut self, context: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(context)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Truncated { context })?;
        self.take(len, context)
    }

    /// Reads a short string: `u8` length then UTF-8 bytes.
    pub(crate) fn shortstr(&mut self, context: &'static str) -> Result<String, DecodeError> {
        let len = self.u8(context)?;
        let raw = self.take(usize::from(len), context)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { context })
    }

    /// Reads a long string: `u32` length then raw bytes (copied out of the
    /// frame because the caller only lends us a slice).
    pub(crate) fn longstr(&mut self, context: &'static str) -> Result<Bytes, DecodeError> {
        self.long_slice(context).map(Bytes::copy_from_slice)
    }

    /// Fails if any input is left over.
    pub(crate) fn finish(&self, context: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                context,
                count: self.buf.len(),
            })
        }
    }
}

/// The part of `s` that fits in a short string.
///
/// Short strings longer than 255 bytes cannot be represented; rather than
/// emitting a corrupt frame (or making every encoder fallible) the encoders
/// truncate at the last UTF-8 character boundary that fits.
pub(crate) fn fit_shortstr(s: &str) -> &str {
    if s.len() <= SHORTSTR_MAX {
        return s;
    }
    let mut end = SHORTSTR_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Encoded size of a short string (length octet included).
pub(crate) fn shortstr_len(s: &str) -> usize {
    1 + fit_shortstr(s).len()
}

/// Writes a short string, truncating it as described in [`fit_shortstr`].
pub(crate) fn put_shortstr(out: &mut BytesMut, s: &str) {
    let s = fit_shortstr(s);
    // fit_shortstr guarantees len <= 255.
    out.put_u8(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.put_slice(s.as_bytes());
}

/// The part of `b` that fits behind a `u32` length prefix. Anything larger
/// than 4 GiB could never fit in a frame anyway; truncating keeps the
/// encoding self-consistent.
fn fit_long(b: &[u8]) -> &[u8] {
    let max = usize::try_from(u32::MAX).unwrap_or(usize::MAX);
    b.get(..max).unwrap_or(b)
}

/// Encoded size of a long string (length prefix included).
pub(crate) fn longstr_len(b: &[u8]) -> usize {
    4 + fit_long(b).len()
}

/// Writes a long string: `u32` length then the bytes.
pub(crate) fn put_longstr(out: &mut BytesMut, b: &[u8]) {
    let b = fit_long(b);
    out.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    out.put_slice(b);
}

/// Reserves a `u32` length slot at the end of `out`; returns its position for
/// [`patch_u32_len`].
pub(crate) fn begin_u32_len(out: &mut BytesMut) -> usize {
    let pos = out.len();
    out.put_u32(0);
    pos
}

/// Fills the length slot at `pos` with the number of bytes written after it.
pub(crate) fn patch_u32_len(out: &mut BytesMut, pos: usize) {
    let written = out.len().saturating_sub(pos + 4);
    let len = u32::try_from(written).unwrap_or(u32::MAX);
    if let Some(slot) = out.get_mut(pos..pos + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}
