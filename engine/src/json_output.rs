//! JSON mode (OpenAI's `response_format: {"type": "json_object"}`): the
//! output is held to a JSON object by masking, at every position, the tokens
//! whose bytes would leave what has been written so far no longer the start
//! of one.
//!
//! A byte-level pushdown machine ([`JsonMachine`]) reads RFC 8259 JSON whose
//! top-level value is an object. The mask for a position replays the output
//! so far through a fresh machine, then tries every token's bytes on a copy
//! of it (the machine is `Copy`: a fixed-depth stack, no allocation). The
//! request's stop tokens are allowed exactly when the object is complete,
//! and nothing else is then, so a JSON-mode completion that stops is a
//! whole object. Runs of whitespace are capped, so that a model cannot
//! stall in JSON's one free-form place outside strings.

use std::sync::Arc;

/// Deepest nesting of objects and arrays JSON mode writes.
pub const MAX_DEPTH: usize = 32;
/// Longest run of whitespace between JSON tokens (enough for pretty
/// printing at the deepest nesting's usual indent).
pub const MAX_WHITESPACE_RUN: u8 = 40;

/// The bytes each token id stands for, as written into the output; `None`
/// for tokens that write no text (special and control tokens), which JSON
/// mode never samples (except a stop token, once the object is complete).
#[derive(Debug, Default)]
pub struct TokenTexts {
    texts: Vec<Option<Box<[u8]>>>,
}

impl TokenTexts {
    pub fn new(texts: Vec<Option<Vec<u8>>>) -> Self {
        Self {
            texts: texts
                .into_iter()
                .map(|t| t.filter(|t| !t.is_empty()).map(Vec::into_boxed_slice))
                .collect(),
        }
    }

    /// From a model's tokenizer: its special tokens write no text.
    pub fn from_tokenizer(tok: &tandem_model::tokenizer::Tokenizer) -> Arc<Self> {
        let n = tok.vocab_size() as u32;
        Arc::new(Self::new(
            (0..n)
                .map(|id| {
                    (!tok.is_special(id))
                        .then(|| tok.token_bytes(id).map(<[u8]>::to_vec))
                        .flatten()
                })
                .collect(),
        ))
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    fn text(&self, id: u32) -> Option<&[u8]> {
        self.texts.get(id as usize).and_then(|t| t.as_deref())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    /// `-`
    Minus,
    /// A leading `0` (no more digits may follow it).
    Zero,
    Int,
    /// `.` with no digit yet.
    Dot,
    Frac,
    /// `e` or `E` with no sign or digit yet.
    E,
    /// The exponent's sign.
    ESign,
    Exp,
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }

    /// The state after `b`, if `b` continues the number.
    fn next(self, b: u8) -> Option<Num> {
        use Num::*;
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, b'1'..=b'9') => Int,
            (Int, b'0'..=b'9') => Int,
            (Zero | Int, b'.') => Dot,
            (Dot | Frac, b'0'..=b'9') => Frac,
            (Zero | Int | Frac, b'e' | b'E') => E,
            (E, b'+' | b'-') => ESign,
            (E | ESign | Exp, b'0'..=b'9') => Exp,
            _ => return None,
        })
    }
}

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object.
    Start,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    ObjectKey,
    /// After a key: `:`.
    Colon,
    /// After `:` or `,` in an array: a value.
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After a value inside an object or array: `,` or its closer.
    After,
    /// Inside a string (`key`: an object's key).
    Str {
        key: bool,
    },
    /// After a backslash in a string.
    Escape {
        key: bool,
    },
    /// Inside `\uXXXX`, `left` hex digits to go.
    Hex {
        key: bool,
        left: u8,
    },
    Number(Num),
    /// Inside `true`, `false` or `null` (`word` indexes [`LITERALS`]), `at`
    /// bytes of it written.
    Literal {
        word: u8,
        at: u8,
    },
    /// The top-level object is closed: nothing more may be written.
    Done,
}

/// Reads JSON a byte at a time and says whether it is still the start of
/// a JSON object. `Copy`, so that trying a token is a copy, not a rollback.
#[derive(Debug, Clone, Copy)]
pub struct JsonMachine {
    /// `{` or `[` per open container, innermost last.
    stack: [u8; MAX_DEPTH],
    depth: u8,
    mode: Mode,
    /// Whitespace bytes in a row outside strings.
    whitespace: u8,
    /// UTF-8 continuation bytes still owed by a character in a string.
    utf8_left: u8,
}

impl Default for JsonMachine {
    fn default() -> Self {
        Self {
            stack: [0; MAX_DEPTH],
            depth: 0,
            mode: Mode::Start,
            whitespace: 0,
            utf8_left: 0,
        }
    }
}

impl JsonMachine {
    /// The machine after `bytes`, or `None` if they are not the start of a
    /// JSON object.
    pub fn after(bytes: &[u8]) -> Option<Self> {
        let mut m = Self::default();
        m.feed_all(bytes).then_some(m)
    }

    /// Whether a whole object has been read (nothing more may follow).
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Feeds `bytes`; `false` (the machine then undefined) if one of them
    /// cannot come next.
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.feed(b))
    }

    /// Feeds one byte; `false` if it cannot come next.
    pub fn feed(&mut self, b: u8) -> bool {
        match self.mode {
            Mode::Str { key } => self.string_byte(key, b),
            Mode::Escape { key } => {
                self.mode = match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Mode::Str { key },
                    b'u' => Mode::Hex { key, left: 4 },
                    _ => return false,
                };
                true
            }
            Mode::Hex { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                self.mode = if left == 1 {
                    Mode::Str { key }
                } else {
                    Mode::Hex {
                        key,
                        left: left - 1,
                    }
                };
                true
            }
            Mode::Number(n) => match n.next(b) {
                Some(next) => {
                    self.mode = Mode::Number(next);
                    true
                }
                // The byte ends the number and is read after it.
                None => {
                    n.complete() && {
                        self.value_done();
                        self.feed(b)
                    }
                }
            },
            Mode::Literal { word, at } => {
                let lit = LITERALS[word as usize];
                if lit[at as usize] != b {
                    return false;
                }
                if at as usize + 1 == lit.len() {
                    self.value_done();
                } else {
                    self.mode = Mode::Literal { word, at: at + 1 };
                }
                true
            }
            Mode::Done => false,
            _ if matches!(b, b' ' | b'\t' | b'\n' | b'\r') => {
                self.whitespace += 1;
                self.whitespace <= MAX_WHITESPACE_RUN
            }
            mode => {
                self.whitespace = 0;
                self.structural(mode, b)
            }
        }
    }

    fn string_byte(&mut self, key: bool, b: u8) -> bool {
        if self.utf8_left > 0 {
            self.utf8_left -= 1;
            return b & 0xC0 == 0x80;
        }
        match b {
            b'"' => {
                if key {
                    self.mode = Mode::Colon;
                } else {
                    self.value_done();
                }
                true
            }
            b'\\' => {
                self.mode = Mode::Escape { key };
                true
            }
            0x00..=0x1F | 0x7F => false,
            0x20..=0x7E => true,
            // UTF-8 lead bytes (no overlong two-byte forms).
            0xC2..=0xDF => {
                self.utf8_left = 1;
                true
            }
            0xE0..=0xEF => {
                self.utf8_left = 2;
                true
            }
            0xF0..=0xF4 => {
                self.utf8_left = 3;
                true
            }
            _ => false,
        }
    }

    fn structural(&mut self, mode: Mode, b: u8) -> bool {
        match (mode, b) {
            (Mode::Start, b'{') => self.push(b'{'),
            (Mode::ObjectFirst | Mode::ObjectKey, b'"') => {
                self.mode = Mode::Str { key: true };
                true
            }
            (Mode::ObjectFirst, b'}') | (Mode::ArrayFirst, b']') => self.pop(),
            (Mode::Colon, b':') => {
                self.mode = Mode::Value;
                true
            }
            (Mode::Value | Mode::ArrayFirst, _) => self.start_value(b),
            (Mode::After, b',') => {
                self.mode = if self.top() == b'{' {
                    Mode::ObjectKey
                } else {
                    Mode::Value
                };
                true
            }
            (Mode::After, b'}') if self.top() == b'{' => self.pop(),
            (Mode::After, b']') if self.top() == b'[' => self.pop(),
            _ => false,
        }
    }

    fn start_value(&mut self, b: u8) -> bool {
        self.mode = match b {
            b'"' => Mode::Str { key: false },
            b'{' => return self.push(b'{'),
            b'[' => return self.push(b'['),
            b'-' => Mode::Number(Num::Minus),
            b'0' => Mode::Number(Num::Zero),
            b'1'..=b'9' => Mode::Number(Num::Int),
            b't' => Mode::Literal { word: 0, at: 1 },
            b'f' => Mode::Literal { word: 1, at: 1 },
            b'n' => Mode::Literal { word: 2, at: 1 },
            _ => return false,
        };
        true
    }

    fn top(&self) -> u8 {
        self.stack[self.depth as usize - 1]
    }

    fn push(&mut self, c: u8) -> bool {
        if self.depth as usize == MAX_DEPTH {
            return false;
        }
        self.stack[self.depth as usize] = c;
        self.depth += 1;
        self.mode = if c == b'{' {
            Mode::ObjectFirst
        } else {
            Mode::ArrayFirst
        };
        true
    }

    fn pop(&mut self) -> bool {
        self.depth -= 1;
        self.value_done();
        true
    }

    fn value_done(&mut self) {
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        };
    }
}

/// Which tokens may come next in JSON mode after `output` (the tokens
/// written so far): `allowed[id]`. A stop token is allowed exactly when the
/// object is complete. `None` when `output` itself is no JSON object's
/// start (it was not written under this mask).
pub fn allowed_tokens(texts: &TokenTexts, output: &[u32], stop: &[u32]) -> Option<Vec<bool>> {
    let mut m = JsonMachine::default();
    for &t in output {
        if !m.feed_all(texts.text(t)?) {
            return None;
        }
    }
    let complete = m.is_complete();
    Some(
        (0..texts.len() as u32)
            .map(|id| {
                if stop.contains(&id) {
                    return complete;
                }
                match texts.text(id) {
                    Some(bytes) if !complete => {
                        let mut tried = m;
                        tried.feed_all(bytes)
                    }
                    _ => false,
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(s: &str) -> bool {
        JsonMachine::after(s.as_bytes()).is_some()
    }

    fn complete(s: &str) -> bool {
        JsonMachine::after(s.as_bytes()).is_some_and(|m| m.is_complete())
    }

    #[test]
    fn whole_objects_are_complete_and_their_prefixes_are_not() {
        let docs = [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#" {"name": "Ada", "born": 1815, "tags": ["math", "poetry"], "ok": true}"#,
            r#"{"n": -0.5e+10, "z": 0, "x": [1, 2.25, -3E2], "e": {}, "l": [], "u": null}"#,
            "{\n  \"nested\": {\"deep\": [[{\"x\": false}]]},\n  \"s\": \"q\\\"uote \\u00e9 \\n\"\n}",
            "{\"unicode\": \"caf\u{e9} \u{65e5}\u{672c} \u{1f600}\"}",
        ];
        for d in docs {
            // Every byte prefix is accepted; only the whole text completes.
            let b = d.as_bytes();
            for i in 0..b.len() {
                let m = JsonMachine::after(&b[..i]);
                let head = String::from_utf8_lossy(&b[..i]);
                assert!(m.is_some(), "prefix {head:?} of {d:?}");
                assert!(!m.unwrap().is_complete(), "{d:?} complete at {i}");
            }
            assert!(complete(d), "{d:?}");
            // The machine agrees with a real JSON parser.
            let v: serde_json::Value = serde_json::from_str(d).unwrap();
            assert!(v.is_object());
        }
    }

    #[test]
    fn what_is_not_json_or_not_an_object_is_refused() {
        for bad in [
            "[1]",
            "\"text\"",
            "42",
            "x",
            "{a: 1}",
            "{'a': 1}",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1.}",
            "{\"a\": .5}",
            "{\"a\": -}",
            "{\"a\": 1e}",
            "{\"a\": tru}",
            "{\"a\": True}",
            "{\"a\": [1,]}",
            "{\"a\": 1,}",
            "{\"a\": 1]",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"\\u12g4\"}",
            "{\"a\": \"tab\there\"}",
            "{} {}",
            "{}x",
            "{\"a\": \"\u{80}\"}\u{0}",
        ] {
            let m = JsonMachine::after(bad.as_bytes());
            assert!(
                m.is_none() || !m.unwrap().is_complete(),
                "{bad:?} was taken as a whole object"
            );
        }
        // Broken UTF-8 inside strings.
        assert!(JsonMachine::after(b"{\"a\": \"\xC3\"").is_none());
        assert!(JsonMachine::after(b"{\"a\": \"\xC0\xAF").is_none());
        assert!(JsonMachine::after(b"{\"a\": \"\xFF").is_none());
        // Numbers end at the byte after them, which is then read.
        assert!(complete("{\"a\":1}"));
        assert!(complete("{\"a\":[1,-2]}"));
        assert!(!accepts("{\"a\":1x"));
    }

    #[test]
    fn nesting_and_whitespace_are_bounded() {
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH - 1);
        assert!(accepts(&deep));
        assert!(!accepts(&(deep + "[")));
        let ws = " ".repeat(MAX_WHITESPACE_RUN as usize);
        assert!(accepts(&format!("{{{ws}\"a\"{ws}:{ws}1{ws}}}")));
        assert!(!accepts(&format!("{{{ws} ")));
        // Whitespace inside strings is text, not counted.
        let long = " ".repeat(200);
        assert!(complete(&format!("{{\"a\": \"{long}\"}}")));
    }

    #[test]
    fn the_mask_follows_the_output_and_stops_only_a_whole_object() {
        // 0 `{`, 1 `"k"`, 2 `:`, 3 ` 1`, 4 `}`, 5 `x`, 6 (special), 7 `": "`,
        // 8 `},` 9 `{"`.
        let texts = TokenTexts::new(
            ["{", "\"k\"", ":", " 1", "}", "x", "", "\": \"", "},", "{\""]
                .iter()
                .map(|s| Some(s.as_bytes().to_vec()))
                .collect(),
        );
        let stop = [6];
        let allowed = |out: &[u32]| -> Vec<u32> {
            let m = allowed_tokens(&texts, out, &stop).expect("a valid start");
            (0..m.len() as u32).filter(|&i| m[i as usize]).collect()
        };
        assert_eq!(allowed(&[]), vec![0, 9]);
        assert_eq!(allowed(&[0]), vec![1, 4, 7]);
        assert_eq!(allowed(&[0, 1]), vec![2]);
        assert_eq!(allowed(&[0, 1, 2]), vec![0, 1, 3, 7, 9]);
        assert_eq!(allowed(&[0, 1, 2, 3]), vec![4]);
        // Complete: only the stop token.
        assert_eq!(allowed(&[0, 1, 2, 3, 4]), vec![6]);
        assert_eq!(allowed(&[0, 4]), vec![6]);
        // Inside a string, text and the closing quote pattern.
        assert_eq!(allowed(&[9]), vec![0, 2, 3, 4, 5, 7, 8, 9]);
        // An output that is not JSON has no mask.
        assert!(allowed_tokens(&texts, &[5], &stop).is_none());
        assert!(allowed_tokens(&texts, &[6], &stop).is_none());
    }
}
