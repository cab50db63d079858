//! Incremental, UTF-8-safe detokenisation and stop-string matching.
//!
//! The router streams text while tokens arrive one at a time. Two things make
//! that harder than decoding each token alone:
//!
//! * a byte-level BPE token can hold part of a UTF-8 character (an emoji is
//!   often split over two or three tokens), so text may only be emitted once
//!   the character is complete;
//! * a stop string can span several tokens, so text that might be the start
//!   of a stop string must be held back until it is known not to be one.
//!
//! [`IncrementalDecoder`] works on the raw bytes of each token
//! ([`Tokenizer::token_bytes`]) and emits the longest complete UTF-8 prefix;
//! the concatenation of everything it emits equals `Tokenizer::decode` of all
//! the ids. [`StopMatcher`] then sits between the decoder and the client.

use std::borrow::Borrow;
use std::sync::Arc;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// Streams text out of token ids. `T` is anything that lends a
/// [`Tokenizer`] (`Arc<Tokenizer>`, `&Tokenizer`, …) so the decoder can live
/// in a task that owns its tokenizer handle.
pub struct IncrementalDecoder<T: Borrow<Tokenizer> = Arc<Tokenizer>> {
    tokenizer: T,
    skip_special: bool,
    /// Bytes received but not yet emitted (an incomplete UTF-8 sequence).
    pending: Vec<u8>,
    /// No byte has been produced yet (the SentencePiece leading space is
    /// dropped from the first byte of the whole text, as `decode` does).
    at_start: bool,
    ids: Vec<u32>,
}

impl<T: Borrow<Tokenizer>> IncrementalDecoder<T> {
    /// `skip_special` drops special tokens (e.g. `<|im_end|>`) from the text.
    pub fn new(tokenizer: T, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            pending: Vec::new(),
            at_start: true,
            ids: Vec::new(),
        }
    }

    /// Feeds one token id and returns the text that became complete (possibly
    /// empty). An id outside the vocabulary is an error.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let tok = self.tokenizer.borrow();
        let bytes = tok.token_bytes(id).ok_or_else(|| {
            ModelError::Tokenizer(format!("token id {id} is outside the vocabulary"))
        })?;
        self.ids.push(id);
        if self.skip_special && tok.is_special(id) {
            return Ok(String::new());
        }
        let mut bytes = bytes;
        if self.at_start && !bytes.is_empty() {
            if tok.strips_leading_space() && bytes[0] == b' ' {
                bytes = &bytes[1..];
            }
            self.at_start = false;
        }
        self.pending.extend_from_slice(bytes);
        Ok(self.drain_complete())
    }

    /// Feeds several ids; returns the concatenated new text.
    pub fn push_all(&mut self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for &id in ids {
            out.push_str(&self.push(id)?);
        }
        Ok(out)
    }

    /// Flushes what is left at the end of the stream: an incomplete character
    /// becomes U+FFFD (as `decode` would write it).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// All ids fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Emits the complete prefix of `pending`. Invalid bytes (not merely
    /// incomplete ones) become U+FFFD, exactly like `String::from_utf8_lossy`
    /// over the whole text.
    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Safe: from_utf8 vouched for these bytes.
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..start + valid])
                            .unwrap_or_default(),
                    );
                    start += valid;
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            start += n;
                        }
                        // Incomplete sequence at the end: wait for more bytes.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

/// What one [`StopMatcher::push`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopStep {
    /// Text that is safe to send now.
    pub text: String,
    /// Index (into the stop list) of the stop string that matched; the text
    /// was truncated right before it and the stream is over.
    pub stopped: Option<usize>,
}

/// Finds stop strings in streamed text.
///
/// Text that could still become a stop string is held back; once the match
/// fails it is released. When a stop string appears, everything before it is
/// returned and everything from it on is dropped.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        Self {
            stops: stops.iter().map(|s| s.as_ref().to_string()).collect(),
            held: String::new(),
            stopped: None,
        }
    }

    /// The stop strings, in the order given.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Which stop string ended the stream, if one did.
    pub fn stopped(&self) -> Option<usize> {
        self.stopped
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stopped.is_some() {
            return StopStep {
                text: String::new(),
                stopped: self.stopped,
            };
        }
        self.held.push_str(text);
        // Earliest match wins; on a tie, the longer stop string.
        let mut best: Option<(usize, usize)> = None; // (position, stop index)
        for (i, s) in self.stops.iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            if let Some(pos) = self.held.find(s.as_str()) {
                let better = match best {
                    None => true,
                    Some((bp, bi)) => pos < bp || (pos == bp && s.len() > self.stops[bi].len()),
                };
                if better {
                    best = Some((pos, i));
                }
            }
        }
        if let Some((pos, i)) = best {
            let text = self.held[..pos].to_string();
            self.held.clear();
            self.stopped = Some(i);
            return StopStep {
                text,
                stopped: Some(i),
            };
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > keep && self.held.ends_with(&s[..k]) {
                    keep = k;
                }
            }
        }
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopStep {
            text,
            stopped: None,
        }
    }

    /// End of stream without a stop: releases the held-back text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_support::{default_model_tokenizer, smollm2_cases, tiny_spm};

    /// Streams ids one by one; checks no chunk is cut inside a character
    /// (they are `String`s) and returns the chunks.
    fn stream<T: Borrow<Tokenizer>>(t: T, ids: &[u32], skip_special: bool) -> Vec<String> {
        let mut d = IncrementalDecoder::new(t, skip_special);
        let mut chunks: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        chunks.push(d.finish());
        assert_eq!(d.ids(), ids);
        chunks
    }

    #[test]
    fn streaming_matches_full_decode_on_fixtures() {
        let t = default_model_tokenizer();
        let t = Arc::new(t);
        for c in smollm2_cases() {
            let chunks = stream(t.clone(), &c.ids, false);
            assert_eq!(chunks.concat(), c.decoded, "{:?}", c.text);
            assert_eq!(
                chunks.last().unwrap(),
                "",
                "nothing left for finish() on {:?}",
                c.text
            );
            let chunks = stream(&*t, &c.ids, true);
            assert_eq!(chunks.concat(), c.decoded_skip_special, "{:?}", c.text);
        }
    }

    #[test]
    fn emoji_split_across_tokens() {
        let t = default_model_tokenizer();
        let ids = t.encode("a😀b", false).unwrap();
        // The emoji's 4 bytes are spread over several byte-level tokens.
        assert!(ids.len() >= 3, "{ids:?}");
        let chunks = stream(&t, &ids, false);
        assert_eq!(chunks.concat(), "a😀b");
        assert!(
            chunks.iter().any(|c| c.is_empty()),
            "some token must complete no character: {chunks:?}"
        );
        assert!(chunks.iter().any(|c| c.contains('😀')));
        assert!(!chunks.concat().contains('\u{FFFD}'));
        // A stream cut in the middle of the emoji flushes U+FFFD at the end.
        let emoji_ids = t.encode("😀", false).unwrap();
        assert!(emoji_ids.len() >= 2);
        let mut d = IncrementalDecoder::new(&t, false);
        assert_eq!(d.push(emoji_ids[0]).unwrap(), "");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert!(d.push(u32::MAX).is_err());
    }

    #[test]
    fn sentencepiece_streaming_keeps_spaces() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm(None)).unwrap();
        for text in [
            "hello world",
            "hello  world",
            "hez中 world",
            "<s>hello</s> world",
            " world",
        ] {
            let ids = t.encode(text, true).unwrap();
            for skip in [false, true] {
                let chunks = stream(&t, &ids, skip);
                assert_eq!(
                    chunks.concat(),
                    t.decode(&ids, skip).unwrap(),
                    "{text:?} skip={skip}"
                );
            }
        }
        // The bare "▁" token before a byte-fallback token keeps its space
        // (a window-based decoder that strips per window loses it).
        let ids = t.encode("hello 中", false).unwrap();
        assert_eq!(stream(&t, &ids, false).concat(), "hello 中");
    }

    #[test]
    fn decoder_and_stop_matcher_together() {
        let t = default_model_tokenizer();
        let text = "Sure! Here it is.<|im_end|>\nUser: more";
        let ids = t.encode(text, false).unwrap();
        let mut d = IncrementalDecoder::new(&t, false);
        let mut m = StopMatcher::new(&["\nUser:", "Here it is."]);
        let mut out = String::new();
        let mut stopped = None;
        for &id in &ids {
            let step = m.push(&d.push(id).unwrap());
            out.push_str(&step.text);
            if step.stopped.is_some() {
                stopped = step.stopped;
                break;
            }
        }
        assert_eq!(stopped, Some(1));
        assert_eq!(out, "Sure! ");
    }

    fn matcher_run(stops: &[&str], chunks: &[&str]) -> (String, Option<usize>) {
        let mut m = StopMatcher::new(stops);
        let mut out = String::new();
        for c in chunks {
            let step = m.push(c);
            out.push_str(&step.text);
            if step.stopped.is_some() {
                return (out, step.stopped);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_spanning_chunks() {
        let mut m = StopMatcher::new(&["</answer>", "STOP"]);
        assert_eq!(m.push("The result is 4<").text, "The result is 4");
        assert_eq!(m.push("/ans").text, "");
        let step = m.push("wer> trailing");
        assert_eq!(
            step,
            StopStep {
                text: String::new(),
                stopped: Some(0)
            }
        );
        assert_eq!(m.stopped(), Some(0));
        // After a stop nothing more comes out.
        assert_eq!(m.push("more").text, "");
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn hold_back_released_when_match_fails() {
        let mut m = StopMatcher::new(&["\n\nUser:"]);
        assert_eq!(m.push("Hi\n").text, "Hi");
        assert_eq!(m.push("\nUs").text, "");
        assert_eq!(m.push("ually").text, "\n\nUsually");
        assert_eq!(m.push(" fine\n").text, " fine");
        assert_eq!(m.finish(), "\n");
    }

    #[test]
    fn stop_cases() {
        assert_eq!(
            matcher_run(&["abc"], &["xxab", "c yy"]),
            ("xx".into(), Some(0))
        );
        assert_eq!(
            matcher_run(&["abc"], &["a", "b", "d"]),
            ("abd".into(), None)
        );
        // Earliest match wins, regardless of list order.
        assert_eq!(
            matcher_run(&["world", "hello"], &["say hello world"]),
            ("say ".into(), Some(1))
        );
        // Same position: longer stop string.
        assert_eq!(
            matcher_run(&["ab", "abc"], &["xabc"]),
            ("x".into(), Some(1))
        );
        // Overlapping prefixes: "aab" inside "aaab".
        assert_eq!(
            matcher_run(&["aab"], &["a", "a", "a", "b", "z"]),
            ("a".into(), Some(0))
        );
        // Multi-byte stop string split in the middle of the text.
        assert_eq!(matcher_run(&["€€"], &["1€", "€2"]), ("1".into(), Some(0)));
        assert_eq!(matcher_run(&["€€"], &["1€", "2€"]), ("1€2€".into(), None));
        // Empty stop strings are ignored; no stops passes everything through.
        assert_eq!(matcher_run(&[""], &["abc"]), ("abc".into(), None));
        assert_eq!(matcher_run(&[], &["abc", "def"]), ("abcdef".into(), None));
        // Stop at the very beginning.
        assert_eq!(matcher_run(&["<"], &["<x"]), ("".into(), Some(0)));
    }

    #[test]
    fn held_text_is_minimal() {
        // Only the suffix that is a prefix of a stop string is held.
        let mut m = StopMatcher::new(&["###"]);
        assert_eq!(m.push("a#b#").text, "a#b");
        assert_eq!(m.push("#").text, "");
        assert_eq!(m.push("x").text, "##x");
    }
}
