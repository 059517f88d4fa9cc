//! Canonical form of JSON request bodies (fingerprint input only).
//!
//! A small, strict RFC 8259 parser that keeps exactly the information that
//! distinguishes two requests:
//!
//! * duplicate object keys are kept, in their original relative order;
//! * number literals are kept as text (no float conversion, no rounding);
//! * strings are decoded, so escape spellings do not matter.
//!
//! The canonical form is compact JSON text: no insignificant whitespace,
//! object members stably sorted by the UTF-8 bytes of their decoded keys,
//! numbers as written, and strings re-escaped in a single way (`\"`, `\\`,
//! and `\u00xx` with lower-case hex for U+0000..U+001F; everything else as
//! raw UTF-8). Parsing that text gives back the same sorted tree, so the
//! encoding is injective.
//!
//! Nesting is limited to [`MAX_DEPTH`] containers; the parser checks the
//! limit before it recurses, so hostile input cannot overflow the stack. Work
//! is linear in the body size, apart from sorting the members of each object.
//! The body is parsed into a tree before it is hashed (it must be known to be
//! JSON before the first byte of its encoding is hashed): 32 bytes per value,
//! so up to about 16 times the body size for a body of tiny values such as
//! `[0,0,0,…]`.

use std::borrow::Cow;

/// Deepest nesting of arrays and objects accepted as JSON; deeper bodies are
/// fingerprinted as raw bytes.
pub(crate) const MAX_DEPTH: usize = 128;

/// Why a body is not canonicalisable JSON (it is then hashed as raw bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotJson {
    /// The body is not UTF-8.
    NotUtf8,
    /// The body is not a single JSON value (RFC 8259), or a string in it
    /// holds an escaped lone surrogate.
    Syntax,
    /// Arrays and objects are nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// Receives the canonical form.
pub(crate) trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A parsed JSON value, with every object's members already sorted.
#[derive(Debug)]
enum Node<'a> {
    Null,
    True,
    False,
    /// The literal text, validated against the number grammar.
    Number(&'a str),
    /// The decoded value.
    String(Cow<'a, str>),
    Array(Vec<Node<'a>>),
    /// Members stably sorted by key bytes.
    Object(Vec<(Cow<'a, str>, Node<'a>)>),
}

/// A JSON body in canonical form, ready to be written to a [`Sink`].
#[derive(Debug)]
pub(crate) struct Canonical<'a>(Node<'a>);

/// Parses `body` as a single JSON value (surrounding whitespace allowed).
pub(crate) fn parse(body: &[u8]) -> Result<Canonical<'_>, NotJson> {
    let text = std::str::from_utf8(body).map_err(|_| NotJson::NotUtf8)?;
    let mut parser = Parser { text, pos: 0 };
    let node = parser.value(0)?;
    parser.skip_ws();
    if parser.pos != text.len() {
        return Err(NotJson::Syntax);
    }
    Ok(Canonical(node))
}

impl Canonical<'_> {
    /// Writes the canonical JSON text.
    pub(crate) fn write_to(&self, sink: &mut impl Sink) {
        write_node(&self.0, sink);
    }
}

/// The canonical JSON text of `body`, if it is JSON.
#[cfg(test)]
pub(crate) fn canonical_text(body: &[u8]) -> Result<String, NotJson> {
    let canonical = parse(body)?;
    let mut out = Vec::new();
    canonical.write_to(&mut out);
    String::from_utf8(out).map_err(|_| NotJson::NotUtf8)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), NotJson> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(NotJson::Syntax)
        }
    }

    fn literal(&mut self, word: &str, node: Node<'a>) -> Result<Node<'a>, NotJson> {
        match self.text.get(self.pos..self.pos + word.len()) {
            Some(s) if s == word => {
                self.pos += word.len();
                Ok(node)
            }
            _ => Err(NotJson::Syntax),
        }
    }

    /// Parses one value; `depth` is the number of containers already open.
    /// The depth limit is checked before descending, so recursion is bounded
    /// by [`MAX_DEPTH`].
    fn value(&mut self, depth: usize) -> Result<Node<'a>, NotJson> {
        self.skip_ws();
        match self.peek() {
            Some(b'{' | b'[') if depth >= MAX_DEPTH => Err(NotJson::TooDeep),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => self.string().map(Node::String),
            Some(b't') => self.literal("true", Node::True),
            Some(b'f') => self.literal("false", Node::False),
            Some(b'n') => self.literal("null", Node::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(NotJson::Syntax),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Node<'a>, NotJson> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Node::Array(items));
        }
        loop {
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Node::Array(items));
                }
                _ => return Err(NotJson::Syntax),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node<'a>, NotJson> {
        self.expect(b'{')?;
        let mut members = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Node::Object(members));
        }
        loop {
            self.skip_ws();
            let key = self.string()?;
            self.skip_ws();
            self.expect(b':')?;
            let value = self.value(depth)?;
            members.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(NotJson::Syntax),
            }
        }
        // `sort_by` is stable: duplicate keys keep their relative order.
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(Node::Object(members))
    }

    /// Parses a string starting at its opening quote and returns its decoded
    /// value, borrowed when it has no escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, NotJson> {
        self.expect(b'"')?;
        let bytes = self.text.as_bytes();
        let mut owned: Option<String> = None;
        let mut run_start = self.pos;
        loop {
            let Some(&b) = bytes.get(self.pos) else {
                return Err(NotJson::Syntax);
            };
            match b {
                b'"' => {
                    let run = self.slice(run_start, self.pos)?;
                    self.pos += 1;
                    return Ok(match owned {
                        None => Cow::Borrowed(run),
                        Some(mut s) => {
                            s.push_str(run);
                            Cow::Owned(s)
                        }
                    });
                }
                b'\\' => {
                    let run = self.slice(run_start, self.pos)?;
                    self.pos += 1;
                    let c = self.escape()?;
                    let s = owned.get_or_insert_with(String::new);
                    s.push_str(run);
                    s.push(c);
                    run_start = self.pos;
                }
                0x00..=0x1f => return Err(NotJson::Syntax),
                _ => self.pos += 1,
            }
        }
    }

    /// A slice between two ASCII delimiters (always on char boundaries).
    fn slice(&self, start: usize, end: usize) -> Result<&'a str, NotJson> {
        self.text.get(start..end).ok_or(NotJson::Syntax)
    }

    /// Decodes the escape after a backslash.
    fn escape(&mut self) -> Result<char, NotJson> {
        let Some(b) = self.peek() else {
            return Err(NotJson::Syntax);
        };
        self.pos += 1;
        Ok(match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                let code = match first {
                    0xD800..=0xDBFF => {
                        self.expect(b'\\')?;
                        self.expect(b'u')?;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(NotJson::Syntax);
                        }
                        0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(NotJson::Syntax),
                    _ => first,
                };
                char::from_u32(code).ok_or(NotJson::Syntax)?
            }
            _ => return Err(NotJson::Syntax),
        })
    }

    fn hex4(&mut self) -> Result<u32, NotJson> {
        let mut value = 0;
        for _ in 0..4 {
            let digit = self
                .peek()
                .and_then(|b| char::from(b).to_digit(16))
                .ok_or(NotJson::Syntax)?;
            value = value * 16 + digit;
            self.pos += 1;
        }
        Ok(value)
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, kept as text.
    fn number(&mut self) -> Result<Node<'a>, NotJson> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(NotJson::Syntax),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(NotJson::Syntax);
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(NotJson::Syntax);
            }
        }
        self.slice(start, self.pos).map(Node::Number)
    }
}

fn write_node(node: &Node<'_>, sink: &mut impl Sink) {
    match node {
        Node::Null => sink.put(b"null"),
        Node::True => sink.put(b"true"),
        Node::False => sink.put(b"false"),
        Node::Number(text) => sink.put(text.as_bytes()),
        Node::String(s) => write_string(s, sink),
        Node::Array(items) => {
            sink.put(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    sink.put(b",");
                }
                write_node(item, sink);
            }
            sink.put(b"]");
        }
        Node::Object(members) => {
            sink.put(b"{");
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    sink.put(b",");
                }
                write_string(key, sink);
                sink.put(b":");
                write_node(value, sink);
            }
            sink.put(b"}");
        }
    }
}

fn write_string(s: &str, sink: &mut impl Sink) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    sink.put(b"\"");
    let bytes = s.as_bytes();
    let mut run_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        sink.put(&bytes[run_start..i]);
        sink.put(escaped);
        run_start = i + 1;
    }
    sink.put(&bytes[run_start..]);
    sink.put(b"\"");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(body: &str) -> String {
        canonical_text(body.as_bytes()).unwrap_or_else(|e| panic!("{body:?}: {e:?}"))
    }

    fn not_json(body: &[u8]) -> NotJson {
        canonical_text(body).unwrap_err()
    }

    #[test]
    fn scalars() {
        assert_eq!(canon("null"), "null");
        assert_eq!(canon(" true "), "true");
        assert_eq!(canon("\n\tfalse\r\n"), "false");
        assert_eq!(canon("\"x\""), "\"x\"");
        assert_eq!(canon("-0"), "-0");
        assert_eq!(canon("1.50e+007"), "1.50e+007");
        assert_eq!(
            canon("123456789012345678901234567890"),
            "123456789012345678901234567890"
        );
    }

    #[test]
    fn whitespace_is_dropped_and_members_sorted() {
        assert_eq!(
            canon(r#" { "b" : [ 1 , 2 ] , "a" : { "d" : null , "c" : true } } "#),
            r#"{"a":{"c":true,"d":null},"b":[1,2]}"#
        );
        assert_eq!(canon("[ ]"), "[]");
        assert_eq!(canon("{ }"), "{}");
    }

    #[test]
    fn keys_sort_by_utf8_bytes() {
        // 'Z' < 'a' < 'é' (0xC3 0xA9) < '😀' (0xF0 ...) by bytes; "" first.
        assert_eq!(
            canon(r#"{"😀":1,"é":2,"a":3,"Z":4,"":5,"ab":6}"#),
            r#"{"":5,"Z":4,"a":3,"ab":6,"é":2,"😀":1}"#
        );
        // U+FFFF (EF BF BF) sorts before U+10000 (F0 90 80 80) by bytes,
        // although UTF-16 code units would order them the other way.
        assert_eq!(
            canon(r#"{"\ud800\udc00":1,"\uffff":2}"#),
            "{\"\u{ffff}\":2,\"\u{10000}\":1}"
        );
    }

    #[test]
    fn duplicate_keys_are_kept_in_order() {
        assert_eq!(canon(r#"{"b":0,"a":1,"a":2}"#), r#"{"a":1,"a":2,"b":0}"#);
        assert_eq!(canon(r#"{"a":2,"b":0,"a":1}"#), r#"{"a":2,"a":1,"b":0}"#);
    }

    #[test]
    fn strings_are_decoded_and_reescaped_one_way() {
        assert_eq!(canon(r#""\u0041\/\u00e9""#), "\"A/é\"");
        assert_eq!(canon(r#""\ud83d\ude00""#), "\"😀\"");
        assert_eq!(
            canon(r#""\"\\\b\f\n\r\t""#),
            r#""\"\\\u0008\u000c\u000a\u000d\u0009""#
        );
        assert_eq!(canon(r#""\u001F\u007f""#), "\"\\u001f\u{7f}\"");
        assert_eq!(canon(r#"{"\u0061":1}"#), r#"{"a":1}"#);
    }

    #[test]
    fn invalid_json_is_rejected() {
        for body in [
            "",
            "   ",
            "nul",
            "nulll",
            "True",
            "01",
            "-",
            "+1",
            "1.",
            ".5",
            "1e",
            "1e+",
            "0x10",
            "NaN",
            "Infinity",
            "[1,]",
            "[1 2]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "{\"a\":}",
            "{'a':1}",
            "[",
            "]",
            "\"abc",
            "\"a\tb\"",
            "\"a\u{0}b\"",
            r#""\x41""#,
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\ud800""#,
            r#""\ud800x""#,
            r#""\ud800\u0041""#,
            r#""\udc00""#,
            r#""\udc00\ud800""#,
            "1 2",
            "{} {}",
            "\u{feff}{}",
            "[1]\u{a0}",
            "// comment\n1",
        ] {
            assert_eq!(not_json(body.as_bytes()), NotJson::Syntax, "{body:?}");
        }
        assert_eq!(not_json(b"\"\xff\""), NotJson::NotUtf8);
        assert_eq!(not_json(b"[\xc3]"), NotJson::NotUtf8);
    }

    #[test]
    fn depth_limit() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(canon(&ok), ok);
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(not_json(deep.as_bytes()), NotJson::TooDeep);
        let objects = format!("{}1{}", "{\"a\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(canonical_text(objects.as_bytes()).is_ok());
        let objects = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(not_json(objects.as_bytes()), NotJson::TooDeep);
    }

    #[test]
    fn hundred_thousand_deep_does_not_overflow() {
        // Run on a thread with the default 2 MiB stack, whatever the harness uses.
        let result = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(|| {
                let deep = "[".repeat(100_000);
                let a = not_json(deep.as_bytes());
                let closed = format!("{deep}{}", "]".repeat(100_000));
                let b = not_json(closed.as_bytes());
                let objects = "{\"a\":".repeat(100_000);
                let c = not_json(objects.as_bytes());
                (a, b, c)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(
            result,
            (NotJson::TooDeep, NotJson::TooDeep, NotJson::TooDeep)
        );
    }

    #[test]
    fn node_size_matches_the_documented_memory_bound() {
        assert!(std::mem::size_of::<Node<'_>>() <= 32);
    }

    #[test]
    fn canonical_text_is_a_fixed_point() {
        for body in [
            r#"{"b":[1,{"z":"\u0000","y":"\""}],"a":-1.5E-3}"#,
            r#"[{"a":1,"a":{"c":2,"b":3}}]"#,
        ] {
            let once = canon(body);
            assert_eq!(canon(&once), once);
        }
    }
}
