//! Low-level helpers shared by the AMQP encoders and decoders: the decoding
//! primitives, built on [nom], and writers for the length-prefixed string
//! types.
//!
//! Decoders are nom parsers over `&[u8]` whose error type is [`WireError`],
//! a thin wrapper around [`DecodeError`]. The primitives here are built from
//! nom's *complete* parsers (`nom::number::complete`,
//! `nom::bytes::complete`), which check the length of their input, so
//! malformed input can only ever produce a [`DecodeError`], never a panic.
//!
//! Every primitive is labelled with a context string via [`label`] (nom's
//! [`nom::error::context`] combinator): running out of input inside it becomes
//! [`DecodeError::Truncated`] with that context. Errors that already say more
//! (invalid UTF-8, unknown field type, ...) are passed through unchanged.
//! [`run`] and [`parse_all`] are the bridges back to `Result<_, DecodeError>`.

use bytes::{BufMut, Bytes, BytesMut};
use nom::bytes::complete::take;
use nom::combinator::eof;
use nom::error::{ContextError, ErrorKind, ParseError};
use nom::multi::many_till;
use nom::number::complete::{be_u16, be_u32, be_u64, be_u8};
use nom::{IResult, Parser};

use super::error::DecodeError;

/// Longest short string the wire format can carry.
pub(crate) const SHORTSTR_MAX: usize = 255;

/// The error type of the wire parsers.
#[derive(Debug)]
pub(crate) enum WireError {
    /// A nom primitive ran out of input (or otherwise failed) and no
    /// [`label`] has said yet what was being decoded.
    Unlabelled,
    /// A complete decode error.
    Decode(DecodeError),
}

impl WireError {
    /// The [`DecodeError`]; an unlabelled error becomes `Truncated { context }`.
    fn into_decode(self, context: &'static str) -> DecodeError {
        match self {
            WireError::Unlabelled => DecodeError::Truncated { context },
            WireError::Decode(e) => e,
        }
    }
}

impl ParseError<&[u8]> for WireError {
    fn from_error_kind(_input: &[u8], _kind: ErrorKind) -> Self {
        WireError::Unlabelled
    }

    fn append(_input: &[u8], _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

impl ContextError<&[u8]> for WireError {
    /// The innermost context wins: only an unlabelled error takes `ctx`.
    fn add_context(_input: &[u8], ctx: &'static str, other: Self) -> Self {
        WireError::Decode(other.into_decode(ctx))
    }
}

/// Result of a wire parser.
pub(crate) type PResult<'a, T> = IResult<&'a [u8], T, WireError>;

/// A nom error carrying `e`, for parsers that detect a semantic error.
pub(crate) fn fail(e: DecodeError) -> nom::Err<WireError> {
    nom::Err::Error(WireError::Decode(e))
}

/// Converts a parser failure into the [`DecodeError`] it stands for.
fn to_decode(err: nom::Err<WireError>, context: &'static str) -> DecodeError {
    match err {
        nom::Err::Error(e) | nom::Err::Failure(e) => e.into_decode(context),
        // Only complete parsers are used, but map it rather than panic.
        nom::Err::Incomplete(_) => DecodeError::Truncated { context },
    }
}

/// Runs `parser` on `input`, returning the rest of the input and the value.
/// An error nothing labelled yet becomes `Truncated { context }`.
pub(crate) fn run<'a, O>(
    context: &'static str,
    mut parser: impl Parser<&'a [u8], Output = O, Error = WireError>,
    input: &'a [u8],
) -> Result<(&'a [u8], O), DecodeError> {
    parser.parse(input).map_err(|e| to_decode(e, context))
}

/// Runs `parser` on `input`, which it must consume exactly (leftover bytes
/// are `TrailingBytes { context }`).
pub(crate) fn parse_all<'a, O>(
    context: &'static str,
    parser: impl Parser<&'a [u8], Output = O, Error = WireError>,
    input: &'a [u8],
) -> Result<O, DecodeError> {
    let (_, (value, ())) = run(context, (parser, finish(context)), input)?;
    Ok(value)
}

/// Labels `parser`: if it fails for lack of input the error is
/// `Truncated { context }`.
pub(crate) fn label<'a, O>(
    context: &'static str,
    parser: impl Parser<&'a [u8], Output = O, Error = WireError>,
) -> impl Parser<&'a [u8], Output = O, Error = WireError> {
    nom::error::context(context, parser)
}

/// An octet.
pub(crate) fn u8<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = u8, Error = WireError> {
    label(context, be_u8)
}

/// A big-endian `u16`.
pub(crate) fn u16<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = u16, Error = WireError> {
    label(context, be_u16)
}

/// A big-endian `u32`.
pub(crate) fn u32<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = u32, Error = WireError> {
    label(context, be_u32)
}

/// A big-endian `u64`.
pub(crate) fn u64<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = u64, Error = WireError> {
    label(context, be_u64)
}

/// A `u8` length and then that many bytes.
fn short_slice<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = &'a [u8], Error = WireError> {
    label(context, |input: &'a [u8]| {
        let (input, len) = be_u8(input)?;
        take(len)(input)
    })
}

/// A `u32` length and then that many bytes.
pub(crate) fn long_slice<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = &'a [u8], Error = WireError> {
    label(context, |input: &'a [u8]| {
        let (input, len) = be_u32(input)?;
        take(len)(input)
    })
}

/// A short string: `u8` length then UTF-8 bytes.
pub(crate) fn shortstr<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = String, Error = WireError> {
    move |input: &'a [u8]| {
        let (input, raw) = short_slice(context).parse(input)?;
        let s = std::str::from_utf8(raw).map_err(|_| fail(DecodeError::InvalidUtf8 { context }))?;
        Ok((input, s.to_owned()))
    }
}

/// A long string: `u32` length then raw bytes (copied out of the frame
/// because the caller only lends us a slice).
pub(crate) fn longstr<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = Bytes, Error = WireError> {
    long_slice(context).map(Bytes::copy_from_slice)
}

/// Succeeds only at the end of the input; otherwise
/// `TrailingBytes { context }`.
pub(crate) fn finish<'a>(
    context: &'static str,
) -> impl Parser<&'a [u8], Output = (), Error = WireError> {
    move |input: &'a [u8]| {
        if input.is_empty() {
            Ok((input, ()))
        } else {
            Err(fail(DecodeError::TrailingBytes {
                context,
                count: input.len(),
            }))
        }
    }
}

/// Applies `item` until the input is used up (the body of a field table or
/// array); the first failing item fails the whole sequence.
pub(crate) fn until_end<'a, O>(
    item: impl Parser<&'a [u8], Output = O, Error = WireError>,
) -> impl Parser<&'a [u8], Output = Vec<O>, Error = WireError> {
    many_till(item, eof).map(|(items, _)| items)
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
