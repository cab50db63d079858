//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or built from
//! the vocabulary embedded in a GGUF file (GPT-2 byte-level BPE and
//! SentencePiece/llama kinds).
//!
//! A GGUF file carries no `tokenizer.json`; it carries the raw pieces
//! (`tokenizer.ggml.tokens`, `token_type`, `merges` or `scores`) plus the name
//! of the pre-tokenizer (`tokenizer.ggml.pre`). We rebuild an equivalent
//! `tokenizers::Tokenizer` from them the way llama.cpp interprets the same
//! metadata, so ids match what the model was trained on.
//!
//! Besides encode/decode, the tokenizer keeps the raw bytes of every token
//! ([`Tokenizer::token_bytes`]) so that streaming detokenisation
//! ([`crate::detok::IncrementalDecoder`]) can work on bytes and never splits
//! a UTF-8 character.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, MetaValue};

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// Texts of special tokens that end a turn in common chat formats. When the
/// vocabulary has one of them as a special/control token, generation stops on
/// it too (llama.cpp collects the same "end of generation" set), because
/// chat models often emit the end-of-turn token rather than EOS.
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
];

/// GPT-2's pre-tokenizer regex (what `ByteLevel { use_regex: true }` applies).
/// Kept for reference in docs/tests; `ByteLevel` embeds the same pattern.
#[allow(dead_code)]
const REGEX_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (tiktoken cl100k-style) pre-tokenizer regex.
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2: like Llama 3 but every digit is its own pre-token.
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o (o200k) pre-tokenizer regex.
const REGEX_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How token strings map back to bytes; decides [`Tokenizer::token_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeStyle {
    /// GPT-2 byte-level: every char of a token stands for one byte.
    ByteLevel,
    /// SentencePiece: `▁` is a space, `<0xNN>` is a raw byte.
    SentencePiece,
    /// Anything else: the bytes of the single-token decode.
    Other,
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Raw bytes of each token id (None where the id has no token).
    pieces: Vec<Option<Vec<u8>>>,
    /// Ids of special tokens (skipped when decoding with `skip_special`).
    special: HashSet<u32>,
    /// SentencePiece with `add_space_prefix`: the decoder drops the space
    /// that encoding prepended to the text.
    strip_leading_space: bool,
    /// `inner.get_vocab_size(true)`, which rebuilds the whole vocabulary
    /// map on every call: computed once, as the router checks every request.
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

// ---------------------------------------------------------------------------
// Metadata helpers
// ---------------------------------------------------------------------------

fn meta_int(v: &MetaValue) -> Option<i64> {
    match *v {
        MetaValue::I8(x) => Some(x as i64),
        MetaValue::I16(x) => Some(x as i64),
        MetaValue::I32(x) => Some(x as i64),
        MetaValue::I64(x) => Some(x),
        _ => v.as_u64().and_then(|x| i64::try_from(x).ok()),
    }
}

/// An optional metadata value converted by `conv`; present but of the
/// wrong type is an error naming the key and the expected type.
fn meta_opt<'a, T>(
    md: &'a BTreeMap<String, MetaValue>,
    key: &str,
    expected: &'static str,
    conv: impl FnOnce(&'a MetaValue) -> Option<T>,
) -> Result<Option<T>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => conv(v).map(Some).ok_or_else(|| ModelError::MetadataType {
            key: key.into(),
            expected,
        }),
    }
}

/// A per-token metadata array (types, scores): every entry converts and
/// there is one per token, or the error names the key.
fn per_token<T>(
    arr: &[MetaValue],
    key: &str,
    expected: &'static str,
    n_tokens: usize,
    conv: impl Fn(&MetaValue) -> Option<T>,
) -> Result<Vec<T>> {
    let v = arr
        .iter()
        .map(conv)
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ModelError::MetadataType {
            key: key.into(),
            expected,
        })?;
    if v.len() != n_tokens {
        return Err(ModelError::Tokenizer(format!(
            "{key} has {} entries but there are {n_tokens} tokens",
            v.len()
        )));
    }
    Ok(v)
}

fn meta_str<'a>(md: &'a BTreeMap<String, MetaValue>, key: &str) -> Result<Option<&'a str>> {
    meta_opt(md, key, "string", |v| v.as_str())
}

fn meta_bool(md: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<bool>> {
    meta_opt(md, key, "bool", |v| v.as_bool())
}

fn meta_u32(md: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<u32>> {
    meta_opt(md, key, "unsigned integer", |v| {
        v.as_u64().and_then(|x| u32::try_from(x).ok())
    })
}

fn meta_array<'a>(
    md: &'a BTreeMap<String, MetaValue>,
    key: &str,
) -> Result<Option<&'a [MetaValue]>> {
    meta_opt(md, key, "array", |v| v.as_array())
}

fn meta_str_array(md: &BTreeMap<String, MetaValue>, key: &str) -> Result<Option<Vec<String>>> {
    let Some(arr) = meta_array(md, key)? else {
        return Ok(None);
    };
    arr.iter()
        .map(|v| v.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
        .map(Some)
        .ok_or_else(|| ModelError::MetadataType {
            key: key.into(),
            expected: "array of strings",
        })
}

// ---------------------------------------------------------------------------
// Byte-level helpers
// ---------------------------------------------------------------------------

/// GPT-2's byte → printable char table (the one `ByteLevel` uses), inverted.
fn byte_level_char_to_byte() -> std::collections::HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

/// `<0xNN>` → the byte NN.
fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Decoder chain used for SentencePiece vocabularies (as HF converts them).
fn sentencepiece_decoder(strip_leading_space: bool) -> Result<DecoderWrapper> {
    let mut chain: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if strip_leading_space {
        chain.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    Ok(DecoderWrapper::Sequence(DecoderSequence::new(chain)))
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value, and
/// whether BPE should take a whole pre-token when it is in the vocabulary
/// (`ignore_merges`, as Llama 3 does).
fn gpt2_pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level_plain = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false));
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?,
        ))
    };
    let regex_then_bytes = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(
            vec![split(re)?, byte_level_plain()],
        )))
    };
    Ok(match pre {
        // Plain GPT-2 regex.
        "default" | "gpt2" | "gpt-2" | "" => (
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            false,
        ),
        // tiktoken-style (Llama 3 and friends).
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" | "falcon3" | "pixtral"
        | "llama4" => (regex_then_bytes(REGEX_LLAMA3)?, true),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" | "hunyuan" => {
            (regex_then_bytes(REGEX_QWEN2)?, false)
        }
        "gpt-4o" | "o200k" => (regex_then_bytes(REGEX_GPT4O)?, false),
        // Digits first split one by one, then the GPT-2 regex.
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            (
                PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(vec![
                    split(r"\p{N}")?,
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
                ])),
                false,
            )
        }
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; using the GPT-2 pre-tokenizer"
            );
            (
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
                false,
            )
        }
    })
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        Self::from_gguf_metadata(&file.metadata)
    }

    /// Builds the tokenizer from GGUF metadata alone (so a vocabulary can be
    /// built without a file, e.g. in tests or for synthetic models).
    pub fn from_gguf_metadata(md: &BTreeMap<String, MetaValue>) -> Result<Self> {
        let model = meta_str(md, "tokenizer.ggml.model")?
            .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.model".into()))?;
        let tokens = meta_str_array(md, "tokenizer.ggml.tokens")?
            .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.tokens".into()))?;
        if tokens.is_empty() {
            return Err(ModelError::Tokenizer(
                "tokenizer.ggml.tokens is empty".into(),
            ));
        }
        if tokens.len() > u32::MAX as usize {
            return Err(ModelError::Tokenizer("vocabulary too large".into()));
        }
        let types: Vec<i64> = match meta_array(md, "tokenizer.ggml.token_type")? {
            None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
            Some(arr) => per_token(
                arr,
                "tokenizer.ggml.token_type",
                "array of integers",
                tokens.len(),
                meta_int,
            )?,
        };
        let n = tokens.len() as u32;
        let check_id = |key: &str| -> Result<Option<u32>> {
            match meta_u32(md, key)? {
                Some(id) if id >= n => Err(ModelError::Tokenizer(format!(
                    "{key} = {id} is outside the vocabulary of {n} tokens"
                ))),
                other => Ok(other),
            }
        };
        let bos = check_id("tokenizer.ggml.bos_token_id")?;
        let eos_primary = check_id("tokenizer.ggml.eos_token_id")?;
        let eot = check_id("tokenizer.ggml.eot_token_id")?;
        let eom = check_id("tokenizer.ggml.eom_token_id")?;
        let unk = check_id("tokenizer.ggml.unknown_token_id")?;

        // First occurrence wins when a vocabulary repeats a string.
        let mut vocab = Vocab::default();
        let mut duplicates = 0usize;
        for (i, t) in tokens.iter().enumerate() {
            if vocab.contains_key(t) {
                duplicates += 1;
            } else {
                vocab.insert(t.clone(), i as u32);
            }
        }
        if duplicates > 0 {
            tracing::warn!(
                duplicates,
                "GGUF vocabulary repeats token strings; later copies are unreachable"
            );
        }

        let (mut inner, style, add_bos_default, strip_leading_space) = match model {
            "gpt2" => {
                let merges_raw = meta_str_array(md, "tokenizer.ggml.merges")?
                    .ok_or_else(|| ModelError::MissingMetadata("tokenizer.ggml.merges".into()))?;
                let mut merges = Vec::with_capacity(merges_raw.len());
                let mut skipped = 0usize;
                for m in &merges_raw {
                    match m.split_once(' ') {
                        Some((a, b))
                            if vocab.contains_key(a)
                                && vocab.contains_key(b)
                                && vocab.contains_key(&format!("{a}{b}")) =>
                        {
                            merges.push((a.to_string(), b.to_string()))
                        }
                        _ => skipped += 1,
                    }
                }
                if skipped > 0 {
                    tracing::warn!(
                        skipped,
                        "ignored GGUF merges whose pieces are not in the vocabulary"
                    );
                }
                let pre = meta_str(md, "tokenizer.ggml.pre")?.unwrap_or("default");
                let (pre_tok, ignore_merges) = gpt2_pre_tokenizer(pre)?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(ignore_merges)
                    .build()
                    .map_err(tok_err)?;
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_pre_tokenizer(Some(pre_tok));
                t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
                (t, DecodeStyle::ByteLevel, false, false)
            }
            "llama" => {
                let scores: Vec<f32> = match meta_array(md, "tokenizer.ggml.scores")? {
                    Some(arr) => per_token(
                        arr,
                        "tokenizer.ggml.scores",
                        "array of floats",
                        tokens.len(),
                        |v| v.as_f64().map(|x| x as f32),
                    )?,
                    // Without scores, earlier ids are treated as more frequent.
                    None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
                };
                let merges = sentencepiece_merges(&tokens, &types, &scores, &vocab);
                let has_bytes = tokens.iter().any(|t| parse_byte_token(t).is_some());
                let unk_id = unk.or_else(|| {
                    types
                        .iter()
                        .position(|&t| t == TOKEN_TYPE_UNKNOWN)
                        .map(|i| i as u32)
                });
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(has_bytes)
                    .fuse_unk(true);
                if let Some(u) = unk_id {
                    builder = builder.unk_token(tokens[u as usize].clone());
                }
                let bpe = builder.build().map_err(tok_err)?;
                let add_space_prefix =
                    meta_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let mut norm = Vec::new();
                if add_space_prefix {
                    norm.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
                }
                norm.push(NormalizerWrapper::Replace(
                    Replace::new(" ", "▁").map_err(tok_err)?,
                ));
                let mut t = tokenizers::Tokenizer::new(bpe);
                t.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
                    norm,
                ))));
                t.with_decoder(Some(sentencepiece_decoder(add_space_prefix)?));
                (t, DecodeStyle::SentencePiece, true, add_space_prefix)
            }
            other => {
                return Err(ModelError::Tokenizer(format!(
                    "unsupported GGUF tokenizer model '{other}' (supported: gpt2, llama)"
                )))
            }
        };

        // Control, unknown and user-defined tokens are matched whole in the
        // raw text (llama.cpp's special-token partitioning), before the
        // normalizer and pre-tokenizer see it.
        let mut specials = Vec::new();
        let mut user = Vec::new();
        let mut seen = HashSet::new();
        for (t, &ty) in tokens.iter().zip(&types) {
            if t.is_empty() || !seen.insert(t.as_str()) {
                continue;
            }
            match ty {
                TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => {
                    specials.push(AddedToken::from(t.clone(), true).normalized(false))
                }
                TOKEN_TYPE_USER_DEFINED => {
                    user.push(AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        inner.add_special_tokens(&specials);
        inner.add_tokens(&user);

        let mut eos = Vec::new();
        for id in [eos_primary, eot, eom].into_iter().flatten() {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        for name in END_OF_TURN_TOKENS {
            if let Some(id) = tokens.iter().position(|t| t == name).map(|i| i as u32) {
                if types[id as usize] == TOKEN_TYPE_CONTROL && !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }

        let add_bos = meta_bool(md, "tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
        let add_eos = meta_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let chat_template = meta_str(md, "tokenizer.chat_template")?.map(str::to_owned);
        let bos_token = bos.map(|i| tokens[i as usize].clone());
        let eos_token = eos_primary.map(|i| tokens[i as usize].clone());
        Ok(Self::assemble(
            inner,
            style,
            bos,
            eos,
            add_bos,
            add_eos,
            chat_template,
            bos_token,
            eos_token,
            strip_leading_space,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        inner: tokenizers::Tokenizer,
        style: DecodeStyle,
        bos: Option<u32>,
        eos: Vec<u32>,
        add_bos: bool,
        add_eos: bool,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        strip_leading_space: bool,
    ) -> Self {
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.len();
        let size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut pieces: Vec<Option<Vec<u8>>> = vec![None; size];
        let char_to_byte = byte_level_char_to_byte();
        for (token, &id) in &vocab {
            let bytes = match style {
                // Same rule as the ByteLevel decoder: a token whose chars are
                // not all in the table is taken as plain UTF-8.
                DecodeStyle::ByteLevel => token
                    .chars()
                    .map(|c| char_to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| token.as_bytes().to_vec()),
                DecodeStyle::SentencePiece => match parse_byte_token(token) {
                    Some(b) => vec![b],
                    None => token.replace('▁', " ").into_bytes(),
                },
                DecodeStyle::Other => inner
                    .decode(&[id], false)
                    .map(String::into_bytes)
                    .unwrap_or_default(),
            };
            pieces[id as usize] = Some(bytes);
        }
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        Self {
            inner,
            bos,
            eos,
            add_bos,
            add_eos,
            chat_template,
            bos_token,
            eos_token,
            pieces,
            special,
            strip_leading_space,
            vocab_size,
        }
    }

    /// Loads `tokenizer.json` (+ `tokenizer_config.json` for BOS/EOS and the chat template).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(ModelError::Tokenizer(format!(
                "{}: no tokenizer.json",
                dir.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen = read_json_opt(&dir.join("generation_config.json"))?;
        let cfg = |k: &str| config.as_ref().and_then(|c| c.get(k));
        // Special tokens in tokenizer_config.json are a string or an
        // AddedToken object `{"content": ...}`.
        let token_text = |v: Option<&serde_json::Value>| -> Option<String> {
            match v? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        let ids_of = |v: Option<&serde_json::Value>| -> Vec<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => n
                    .as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .into_iter()
                    .collect(),
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let gen_field = |k: &str| gen.as_ref().and_then(|g| g.get(k));

        let mut bos_token = token_text(cfg("bos_token"));
        let bos = bos_token
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or_else(|| ids_of(gen_field("bos_token_id")).first().copied());
        if bos_token.is_none() {
            bos_token = bos.and_then(|id| inner.id_to_token(id));
        }
        let mut eos_token = token_text(cfg("eos_token"));
        let mut eos: Vec<u32> = Vec::new();
        let push = |id: u32, eos: &mut Vec<u32>| {
            if !eos.contains(&id) {
                eos.push(id)
            }
        };
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            push(id, &mut eos);
        }
        for id in ids_of(gen_field("eos_token_id")) {
            push(id, &mut eos);
        }
        if eos_token.is_none() {
            eos_token = eos.first().and_then(|&id| inner.id_to_token(id));
        }
        let added = inner.get_added_tokens_decoder();
        for name in END_OF_TURN_TOKENS {
            if let Some((&id, _)) = added.iter().find(|(_, t)| t.special && t.content == *name) {
                push(id, &mut eos);
            }
        }

        // Without an explicit flag, BOS is added when the tokenizer's own
        // post-processor would add it.
        let add_bos = match cfg("add_bos_token").and_then(|v| v.as_bool()) {
            Some(b) => b,
            None => match bos {
                Some(b) => inner
                    .encode("", true)
                    .map(|e| e.get_ids().first() == Some(&b))
                    .unwrap_or(false),
                None => false,
            },
        };
        let add_eos = cfg("add_eos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);

        let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(s) => Some(s),
            Err(_) => {
                let from_json = read_json_opt(&dir.join("chat_template.json"))?.and_then(|v| {
                    v.get("chat_template")
                        .and_then(|t| t.as_str().map(str::to_owned))
                });
                from_json.or_else(|| match cfg("chat_template") {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    // A list of named templates: take "default", else the first.
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .or_else(|| list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_owned),
                    _ => None,
                })
            }
        };

        let (style, strip) = hf_decode_style(&inner);
        Ok(Self::assemble(
            inner,
            style,
            bos,
            eos,
            add_bos,
            add_eos,
            chat_template,
            bos_token,
            eos_token,
            strip,
        ))
    }

    /// Encodes text; `add_special` adds BOS when the model asks for it.
    ///
    /// Special tokens written in the text (e.g. `<|im_start|>` in a rendered
    /// chat template) are recognised and become their single ids.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        if add_special && self.add_eos {
            if let Some(&e) = self.eos.first() {
                ids.push(e);
            }
        }
        Ok(ids)
    }

    /// Decodes ids to text (invalid UTF-8 becomes U+FFFD); ids outside the
    /// vocabulary are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    /// Whether `encode(.., true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    /// Token ids that end generation (EOS, and `<|im_end|>`-style end-of-turn tokens).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
    /// Text of the BOS token (the chat template's `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }
    /// Text of the EOS token (the chat template's `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    /// Whether `id` is a special token (dropped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }
    /// The raw bytes a token stands for (a byte-level token may hold only
    /// part of a UTF-8 character). `None` for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).and_then(|p| p.as_deref())
    }
    /// Whether decoding drops one leading space of the whole text
    /// (SentencePiece vocabularies that prepend a space when encoding).
    pub fn strips_leading_space(&self) -> bool {
        self.strip_leading_space
    }
    /// The whole vocabulary sorted by id (the fingerprint hashes it).
    pub fn vocab_sorted(&self) -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = self
            .inner
            .get_vocab(true)
            .into_iter()
            .map(|(s, i)| (i, s))
            .collect();
        v.sort();
        v
    }
    /// The chat template shipped with the model, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// Merges for a SentencePiece vocabulary: every split of a normal token into
/// two vocabulary pieces, ranked by the token's score (highest first). BPE
/// over these merges reproduces SentencePiece-BPE/llama.cpp's greedy
/// "merge the best-scoring pair" loop (this is also how Hugging Face converts
/// such vocabularies).
fn sentencepiece_merges(
    tokens: &[String],
    types: &[i64],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut cands: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(types).enumerate() {
        if ty != TOKEN_TYPE_NORMAL || vocab.get(t) != Some(&(i as u32)) {
            continue;
        }
        for (p, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(p);
            if let (Some(&il), Some(&ir)) = (vocab.get(l), vocab.get(r)) {
                let usable = |id: u32| {
                    types[id as usize] != TOKEN_TYPE_BYTE
                        && types[id as usize] != TOKEN_TYPE_CONTROL
                };
                if usable(il) && usable(ir) {
                    cands.push((scores[i], i as u32, il, ir));
                }
            }
        }
    }
    cands.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    cands
        .into_iter()
        .map(|(_, _, l, r)| (tokens[l as usize].clone(), tokens[r as usize].clone()))
        .collect()
}

fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>> {
    match std::fs::read_to_string(path) {
        Ok(s) => serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| ModelError::Tokenizer(format!("{}: invalid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ModelError::Io {
            path: path.to_path_buf(),
            cause: e,
        }),
    }
}

/// Reads the decoder of a `tokenizer.json` to learn how tokens map to bytes.
fn hf_decode_style(inner: &tokenizers::Tokenizer) -> (DecodeStyle, bool) {
    let Some(dec) = inner.get_decoder() else {
        return (DecodeStyle::Other, false);
    };
    let json = serde_json::to_value(dec).unwrap_or(serde_json::Value::Null);
    let mut parts = Vec::new();
    fn walk<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        if let Some(ds) = v.get("decoders").and_then(|d| d.as_array()) {
            for d in ds {
                walk(d, out);
            }
        } else {
            out.push(v);
        }
    }
    walk(&json, &mut parts);
    let ty = |v: &serde_json::Value| {
        v.get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string()
    };
    if parts.iter().any(|p| ty(p) == "ByteLevel") {
        return (DecodeStyle::ByteLevel, false);
    }
    let spm = parts.iter().any(|p| {
        let t = ty(p);
        t == "ByteFallback" || t == "Metaspace" || (t == "Replace" && p.to_string().contains('▁'))
    });
    if spm {
        let strip = parts.iter().any(|p| {
            let t = ty(p);
            (t == "Strip" && p.get("start").and_then(|s| s.as_u64()).unwrap_or(0) >= 1)
                || (t == "Metaspace"
                    && p.get("prepend_scheme")
                        .and_then(|s| s.as_str())
                        .unwrap_or("always")
                        != "never")
        });
        return (DecodeStyle::SentencePiece, strip);
    }
    (DecodeStyle::Other, false)
}

/// Shared by the tests of this crate: a tiny SentencePiece vocabulary, the
/// default model's tokenizer and the reference fixture.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn s(v: &str) -> MetaValue {
        MetaValue::String(v.into())
    }

    /// A tiny SentencePiece vocabulary: control tokens, 256 byte tokens and
    /// a few pieces with scores.
    pub(crate) fn tiny_spm(add_space_prefix: Option<bool>) -> BTreeMap<String, MetaValue> {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0.0f32; 3];
        for b in 0..=255u32 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(TOKEN_TYPE_BYTE);
            scores.push(0.0);
        }
        // Pieces: higher score = merged earlier.
        let pieces: &[(&str, f32)] = &[
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("ll", -3.0),
            ("he", -4.0),
            ("hell", -5.0),
            ("hello", -6.0),
            ("▁hello", -7.0),
            ("or", -8.0),
            ("▁w", -9.0),
            ("▁wor", -10.0),
            ("ld", -11.0),
            ("▁world", -12.0),
            ("é", -13.0),
        ];
        for (p, sc) in pieces {
            tokens.push((*p).into());
            types.push(TOKEN_TYPE_NORMAL);
            scores.push(*sc);
        }
        tokens.push("<|user|>".into());
        types.push(TOKEN_TYPE_USER_DEFINED);
        scores.push(0.0);
        let mut md = BTreeMap::new();
        md.insert("tokenizer.ggml.model".into(), s("llama"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert(
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(
                types
                    .into_iter()
                    .map(|t| MetaValue::I32(t as i32))
                    .collect(),
            ),
        );
        md.insert(
            "tokenizer.ggml.scores".into(),
            MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
        );
        md.insert("tokenizer.ggml.bos_token_id".into(), MetaValue::U32(1));
        md.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(2));
        md.insert("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(0));
        if let Some(b) = add_space_prefix {
            md.insert("tokenizer.ggml.add_space_prefix".into(), MetaValue::Bool(b));
        }
        md
    }

    /// The default model's tokenizer. Tests fail loudly when the model is
    /// not installed (`tandem model fetch`); they never skip.
    pub(crate) fn default_model_tokenizer() -> Tokenizer {
        let path = crate::default_model_path();
        assert!(
            path.is_file(),
            "{} not installed: run `tandem model fetch`",
            path.display()
        );
        let file = GgufFile::open(&path).expect("open default model");
        Tokenizer::from_gguf(&file).expect("tokenizer from default model")
    }

    #[derive(serde::Deserialize)]
    pub(crate) struct FixtureCase {
        pub text: String,
        pub ids: Vec<u32>,
        pub decoded: String,
        pub decoded_skip_special: String,
    }

    /// Cases of `fixtures/tokenizer/smollm2.json` (reference/tokenizer_reference.py).
    pub(crate) fn smollm2_cases() -> Vec<FixtureCase> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/tokenizer/smollm2.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        serde_json::from_value(v["cases"].clone()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn arr_s(v: &[&str]) -> MetaValue {
        MetaValue::Array(v.iter().map(|x| s(x)).collect())
    }

    fn names(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect()
    }

    #[test]
    fn default_model_matches_transformers() {
        let t = default_model_tokenizer();
        assert_eq!(t.vocab_size(), 49152);
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[2, 0]);
        assert!(!t.add_bos());
        assert_eq!(t.bos_token(), Some("<|im_start|>"));
        assert_eq!(t.eos_token(), Some("<|im_end|>"));
        assert!(t.chat_template().unwrap().contains("<|im_start|>"));
        assert!(t.is_special(1) && t.is_special(2) && !t.is_special(17));
        let cases = smollm2_cases();
        assert!(cases.len() >= 40);
        for c in &cases {
            let ids = t.encode(&c.text, false).unwrap();
            assert_eq!(ids, c.ids, "encode {:?}", c.text);
            assert_eq!(
                t.decode(&c.ids, false).unwrap(),
                c.decoded,
                "decode {:?}",
                c.text
            );
            assert_eq!(
                t.decode(&c.ids, true).unwrap(),
                c.decoded_skip_special,
                "decode skip {:?}",
                c.text
            );
        }
        // add_bos is false for this model, so add_special changes nothing.
        assert_eq!(
            t.encode("hi", true).unwrap(),
            t.encode("hi", false).unwrap()
        );
        let ids = t.encode("<|im_start|>user", false).unwrap();
        assert_eq!(ids[0], 1);
    }

    #[test]
    fn sentencepiece_encode_decode() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm(None)).unwrap();
        assert!(t.add_bos());
        assert_eq!(t.bos_id(), Some(1));
        assert_eq!(t.eos_ids(), &[2]);
        let ids = t.encode("hello world", false).unwrap();
        assert_eq!(names(&t, &ids), ["▁hello", "▁world"]);
        assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
        let with_bos = t.encode("hello world", true).unwrap();
        assert_eq!(with_bos[0], 1);
        assert_eq!(&with_bos[1..], &ids[..]);
        // Byte fallback: 'z' and '中' are not pieces.
        let ids = t.encode("hez中", false).unwrap();
        assert_eq!(
            names(&t, &ids),
            ["▁", "he", "<0x7A>", "<0xE4>", "<0xB8>", "<0xAD>"]
        );
        assert_eq!(t.decode(&ids, false).unwrap(), "hez中");
        // Piece containing a multi-byte char.
        let ids = t.encode("hé", false).unwrap();
        assert_eq!(names(&t, &ids), ["▁", "h", "é"]);
        // Special tokens are matched whole and the space prefix is added per
        // text fragment, as llama.cpp does.
        let ids = t.encode("<s>hello</s>", false).unwrap();
        assert_eq!(names(&t, &ids), ["<s>", "▁hello", "</s>"]);
        assert_eq!(t.decode(&ids, true).unwrap(), "hello");
        let ids = t.encode("<|user|>world", false).unwrap();
        assert_eq!(names(&t, &ids), ["<|user|>", "▁world"]);
        assert!(!t.is_special(ids[0]));
        assert!(t.is_special(1));
        // Token bytes.
        assert_eq!(
            t.token_bytes(t.token_to_id("▁hello").unwrap()),
            Some(&b" hello"[..])
        );
        assert_eq!(
            t.token_bytes(t.token_to_id("<0xE4>").unwrap()),
            Some(&[0xE4u8][..])
        );
        assert!(t.strips_leading_space());
        assert_eq!(t.token_bytes(100_000), None);
    }

    #[test]
    fn sentencepiece_without_space_prefix() {
        let t = Tokenizer::from_gguf_metadata(&tiny_spm(Some(false))).unwrap();
        let ids = t.encode("hello world", false).unwrap();
        assert_eq!(names(&t, &ids), ["hello", "▁world"]);
        assert_eq!(t.decode(&ids, false).unwrap(), "hello world");
        assert!(!t.strips_leading_space());
    }

    #[test]
    fn gpt2_kind_minimal() {
        // Byte-level vocabulary: every printable byte char plus "Ġ" merges.
        let table = byte_level_char_to_byte();
        let mut chars: Vec<(char, u8)> = table.into_iter().collect();
        chars.sort_by_key(|&(_, b)| b);
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_end|>".into()];
        tokens.extend(chars.iter().map(|(c, _)| c.to_string()));
        tokens.extend(["Ġh", "Ġhi", "12"].iter().map(|s| s.to_string()));
        let mut types = vec![MetaValue::I32(3), MetaValue::I32(3)];
        types.extend(std::iter::repeat_n(MetaValue::I32(1), tokens.len() - 2));
        let mut md = BTreeMap::new();
        md.insert("tokenizer.ggml.model".into(), s("gpt2"));
        md.insert("tokenizer.ggml.pre".into(), s("smollm"));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            MetaValue::Array(tokens.iter().map(|t| s(t)).collect()),
        );
        md.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(types));
        md.insert(
            "tokenizer.ggml.merges".into(),
            arr_s(&["Ġ h", "Ġh i", "1 2", "x missing"]),
        );
        md.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(0));
        let t = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert!(!t.add_bos());
        assert_eq!(t.eos_ids(), &[0, 1]);
        let ids = t.encode("a hi 12<|im_end|>", false).unwrap();
        // smollm splits digits one by one, so "12" never merges.
        assert_eq!(names(&t, &ids), ["a", "Ġhi", "Ġ", "1", "2", "<|im_end|>"]);
        assert_eq!(t.decode(&ids, false).unwrap(), "a hi 12<|im_end|>");
        assert_eq!(t.decode(&ids, true).unwrap(), "a hi 12");
        // The default (GPT-2) regex keeps " 12" together, and the merge applies.
        md.insert("tokenizer.ggml.pre".into(), s("default"));
        let t = Tokenizer::from_gguf_metadata(&md).unwrap();
        let ids = t.encode("12", false).unwrap();
        assert_eq!(names(&t, &ids), ["12"]);
        md.insert("tokenizer.ggml.pre".into(), s("llama-bpe"));
        let t = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(names(&t, &t.encode("12", false).unwrap()), ["12"]);
        md.insert("tokenizer.ggml.pre".into(), s("qwen2"));
        let t = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(names(&t, &t.encode("12", false).unwrap()), ["1", "2"]);
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let mut md = tiny_spm(None);
        md.insert("tokenizer.ggml.model".into(), s("bert"));
        assert!(matches!(
            Tokenizer::from_gguf_metadata(&md),
            Err(ModelError::Tokenizer(_))
        ));
        let mut md = tiny_spm(None);
        md.insert(
            "tokenizer.ggml.bos_token_id".into(),
            MetaValue::U32(1_000_000),
        );
        assert!(Tokenizer::from_gguf_metadata(&md).is_err());
        let mut md = tiny_spm(None);
        md.insert("tokenizer.ggml.tokens".into(), MetaValue::U32(3));
        assert!(matches!(
            Tokenizer::from_gguf_metadata(&md),
            Err(ModelError::MetadataType { .. })
        ));
        let mut md = tiny_spm(None);
        md.remove("tokenizer.ggml.tokens");
        assert!(matches!(
            Tokenizer::from_gguf_metadata(&md),
            Err(ModelError::MissingMetadata(_))
        ));
        let mut md = tiny_spm(None);
        md.insert(
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array(vec![MetaValue::I32(1)]),
        );
        assert!(Tokenizer::from_gguf_metadata(&md).is_err());
    }

    #[test]
    fn hf_dir_loads_tokenizer_json_and_config() {
        // Save a GGUF-built tokenizer as tokenizer.json and read it back.
        let t = Tokenizer::from_gguf_metadata(&tiny_spm(None)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.inner
            .save(dir.path().join("tokenizer.json"), false)
            .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": true,
                "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": [2, 0]}"#,
        )
        .unwrap();
        let h = Tokenizer::from_hf_dir(dir.path()).unwrap();
        assert_eq!(h.bos_id(), Some(1));
        assert_eq!(h.eos_ids(), &[2, 0]);
        assert!(h.add_bos());
        assert_eq!(h.bos_token(), Some("<s>"));
        assert!(h.chat_template().unwrap().contains("bos_token"));
        let ids = h.encode("hello world", true).unwrap();
        assert_eq!(ids, t.encode("hello world", true).unwrap());
        assert_eq!(h.decode(&ids, true).unwrap(), "hello world");
        assert!(h.strips_leading_space());
        assert_eq!(
            h.token_bytes(h.token_to_id("▁world").unwrap()),
            Some(&b" world"[..])
        );
        assert!(Tokenizer::from_hf_dir(&dir.path().join("nope")).is_err());
    }
}
