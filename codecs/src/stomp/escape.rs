//! Header value encoding (spec 1.1/1.2 "Value Encoding").
//!
//! | version | escapes                    | undefined escape |
//! |---------|----------------------------|------------------|
//! | 1.0     | none                       | (no escapes)     |
//! | 1.1     | `\n` `\c` `\\`             | fatal error      |
//! | 1.2     | `\r` `\n` `\c` `\\`        | fatal error      |
//!
//! CONNECT, STOMP and CONNECTED frames are never escaped, in any version.

use bytes::{BufMut, BytesMut};

use super::frame::{Command, Version};

/// Which escaping rules apply to one frame's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Escaping {
    /// Octets are taken literally (1.0; CONNECT, STOMP, CONNECTED).
    None,
    /// `\n`, `\c`, `\\` (1.1).
    V1_1,
    /// `\r`, `\n`, `\c`, `\\` (1.2).
    V1_2,
}

impl Escaping {
    /// The rules for `command` frames in `version`.
    pub(crate) fn for_frame(command: Command, version: Version) -> Escaping {
        if !command.escapes_headers() {
            return Escaping::None;
        }
        match version {
            Version::V1_0 => Escaping::None,
            Version::V1_1 => Escaping::V1_1,
            Version::V1_2 => Escaping::V1_2,
        }
    }
}

/// An escape sequence the rules do not define: the octet after the
/// backslash, or `None` for a backslash at the very end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UndefinedEscape(pub(crate) Option<u8>);

impl UndefinedEscape {
    /// The sequence as text, e.g. `\t`.
    pub(crate) fn sequence(self) -> String {
        match self.0 {
            Some(b) => format!("\\{}", super::error::excerpt(&[b])),
            None => "\\ at the end".to_owned(),
        }
    }
}

/// Decodes the escapes of one header name or value.
pub(crate) fn unescape(raw: &[u8], rules: Escaping) -> Result<Vec<u8>, UndefinedEscape> {
    if rules == Escaping::None || !raw.contains(&b'\\') {
        return Ok(raw.to_vec());
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let decoded = match bytes.next() {
            Some(b'n') => b'\n',
            Some(b'c') => b':',
            Some(b'\\') => b'\\',
            Some(b'r') if rules == Escaping::V1_2 => b'\r',
            other => return Err(UndefinedEscape(other)),
        };
        out.push(decoded);
    }
    Ok(out)
}

/// Writes one header name (`is_name`) or value with `rules` applied.
/// Fails, with a reason, when the text holds an octet these rules cannot
/// carry (the decoder would split or reject the line).
pub(crate) fn escape_into(
    text: &str,
    rules: Escaping,
    is_name: bool,
    out: &mut BytesMut,
) -> Result<(), &'static str> {
    let bytes = text.as_bytes();
    let special = |b: &u8| matches!(b, b'\\' | b':' | b'\n' | b'\r' | 0);
    if !bytes.iter().any(special) {
        out.put_slice(bytes);
        return Ok(());
    }
    for &b in bytes {
        match (b, rules) {
            (0, _) => return Err("it contains a NUL octet"),
            (b'\n', Escaping::None) => {
                return Err("it contains a line feed and this frame is not escaped")
            }
            (b'\r', Escaping::None) => {
                return Err("it contains a carriage return and this frame is not escaped")
            }
            (b'\r', Escaping::V1_1) => {
                return Err("it contains a carriage return, which STOMP 1.1 cannot escape")
            }
            (b':', Escaping::None) if is_name => {
                return Err("the name contains a colon and this frame is not escaped")
            }
            (b':' | b'\\', Escaping::None) => out.put_u8(b),
            (b'\n', _) => out.put_slice(b"\\n"),
            (b'\r', _) => out.put_slice(b"\\r"),
            (b':', _) => out.put_slice(b"\\c"),
            (b'\\', _) => out.put_slice(b"\\\\"),
            _ => out.put_u8(b),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_per_version() {
        assert_eq!(
            unescape(b"a\\cb\\n\\\\", Escaping::V1_1).unwrap(),
            b"a:b\n\\"
        );
        assert_eq!(unescape(b"a\\r", Escaping::V1_2).unwrap(), b"a\r");
        assert_eq!(
            unescape(b"a\\r", Escaping::V1_1),
            Err(UndefinedEscape(Some(b'r')))
        );
        assert_eq!(
            unescape(b"a\\t", Escaping::V1_2),
            Err(UndefinedEscape(Some(b't')))
        );
        assert_eq!(unescape(b"a\\", Escaping::V1_2), Err(UndefinedEscape(None)));
        assert_eq!(unescape(b"a\\t\\", Escaping::None).unwrap(), b"a\\t\\");
    }

    #[test]
    fn escape_per_version() {
        let mut out = BytesMut::new();
        escape_into("a:b\n\\\r", Escaping::V1_2, false, &mut out).unwrap();
        assert_eq!(&out[..], b"a\\cb\\n\\\\\\r");
        out.clear();
        escape_into("a:b\\", Escaping::None, false, &mut out).unwrap();
        assert_eq!(&out[..], b"a:b\\");
        assert!(escape_into("a\r", Escaping::V1_1, false, &mut out).is_err());
        assert!(escape_into("a\n", Escaping::None, false, &mut out).is_err());
        assert!(escape_into("a:b", Escaping::None, true, &mut out).is_err());
        assert!(escape_into("a\0", Escaping::V1_2, false, &mut out).is_err());
    }
}
