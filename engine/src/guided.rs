//! Guided decoding: OpenAI's `response_format` (`json_object` and
//! `json_schema`) and vLLM's regex and choice constraints. At every position
//! the sampler may only pick a token that keeps the output a prefix of some
//! text the grammar accepts, and the request's stop tokens only where the
//! grammar may end; so a guided completion that stops is whole and valid
//! (JSON matching the schema, a full regex match, one of the choices).
//!
//! The grammars and the token masks are llguidance's (the structured-output
//! engine vLLM and llama.cpp use): it compiles a JSON schema into a grammar
//! over the model's token trie and computes a position's mask in tens of
//! microseconds. A request's [`Guide`] holds its parser, advanced by every
//! token the request emits; a resumed request replays its tokens into a
//! fresh one, so that any worker can continue it.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::error::{EngineError, Result};

/// What a completion must look like.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema (JSON text of the schema).
    JsonSchema(String),
    /// Text matching this regular expression, whole (vLLM's `guided_regex`).
    Regex(String),
    /// One of these strings, exactly (vLLM's `guided_choice`).
    Choice(Vec<String>),
}

impl ResponseFormat {
    pub fn is_text(&self) -> bool {
        *self == ResponseFormat::Text
    }

    /// From the wire's separate fields (the router lets through at most
    /// one); if several came anyway, a schema wins over a regex, a regex
    /// over a choice, and any of them over plain JSON mode.
    pub fn from_fields(
        json_object: bool,
        json_schema: Option<String>,
        regex: Option<String>,
        choice: Vec<String>,
    ) -> Self {
        if let Some(schema) = json_schema {
            ResponseFormat::JsonSchema(schema)
        } else if let Some(rx) = regex {
            ResponseFormat::Regex(rx)
        } else if !choice.is_empty() {
            ResponseFormat::Choice(choice)
        } else if json_object {
            ResponseFormat::JsonObject
        } else {
            ResponseFormat::Text
        }
    }

    fn grammar(&self) -> Result<Option<TopLevelGrammar>> {
        Ok(match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(json_grammar(serde_json::json!({"type": "object"}))),
            ResponseFormat::JsonSchema(s) => {
                let schema: serde_json::Value = serde_json::from_str(s).map_err(|e| {
                    EngineError::Sampling(format!("the JSON schema is not JSON: {e}"))
                })?;
                match schema {
                    serde_json::Value::Object(_) => Some(json_grammar(schema)),
                    serde_json::Value::Bool(_) => Some(TopLevelGrammar::from_json_schema(schema)),
                    _ => {
                        return Err(EngineError::Sampling(
                            "a JSON schema is an object (or true/false)".into(),
                        ))
                    }
                }
            }
            ResponseFormat::Regex(rx) => Some(TopLevelGrammar::from_regex(rx)),
            ResponseFormat::Choice(choices) => {
                if choices.is_empty() {
                    return Err(EngineError::Sampling(
                        "a choice needs at least one option".into(),
                    ));
                }
                // One regex of the escaped options: a single lexeme, however
                // many options (as grammar alternatives, each would be a
                // parser item, and thousands exceed the parser's row limit).
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                Some(TopLevelGrammar::from_regex(&format!(
                    "(?:{})",
                    alternatives.join("|")
                )))
            }
        })
    }
}

/// Deepest indent after a line break between two JSON tokens. A gap is
/// nothing, one space, or one line break and an indent of at most this
/// (llama.cpp's rule): room for pretty printing ten levels deep, and none
/// for the place a model stalls in JSON modes, newline after newline until
/// `max_tokens`.
pub const MAX_JSON_INDENT: usize = 20;

/// The grammar of JSON valid against `schema` (an object), with gaps as
/// [`MAX_JSON_INDENT`] says unless the schema sets llguidance's options
/// (`x-guidance`) itself, and objects closed as [`close_objects`] says.
fn json_grammar(mut schema: serde_json::Value) -> TopLevelGrammar {
    close_objects(&mut schema, false);
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_pattern": format!(r"(?:\x20|\x0D?\x0A[\x20\x09]{{0,{MAX_JSON_INDENT}}})")
            })
        });
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// Gives every object schema that lists its `properties` and says nothing
/// of others (`additionalProperties`, `patternProperties`,
/// `unevaluatedProperties`) `"additionalProperties": false`, as vLLM's
/// default structured-output backends (xgrammar, outlines) do. Tool
/// schemas almost never say it, and a model held to JSON Schema's default
/// (any other key allowed) invents keys the caller's function does not
/// take, or keys without end. A member of an `allOf`, and a schema with
/// one, stay open: the members' properties add up.
fn close_objects(schema: &mut serde_json::Value, in_all_of: bool) {
    use serde_json::Value;
    let Value::Object(o) = schema else {
        return;
    };
    for key in [
        "properties",
        "patternProperties",
        "$defs",
        "definitions",
        "dependentSchemas",
    ] {
        if let Some(Value::Object(map)) = o.get_mut(key) {
            for sub in map.values_mut() {
                close_objects(sub, false);
            }
        }
    }
    for key in [
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedProperties",
        "unevaluatedItems",
        "contains",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
        "prefixItems",
        "anyOf",
        "oneOf",
    ] {
        // A schema, or a list of them.
        match o.get_mut(key) {
            Some(sub @ Value::Object(_)) => close_objects(sub, false),
            Some(Value::Array(subs)) => subs.iter_mut().for_each(|s| close_objects(s, false)),
            _ => {}
        }
    }
    let has_all_of = if let Some(Value::Array(subs)) = o.get_mut("allOf") {
        subs.iter_mut().for_each(|s| close_objects(s, true));
        true
    } else {
        false
    };
    let lists_properties = matches!(o.get("properties"), Some(Value::Object(_)));
    let says_others = [
        "additionalProperties",
        "patternProperties",
        "unevaluatedProperties",
    ]
    .iter()
    .any(|k| o.contains_key(*k));
    if lists_properties && !says_others && !in_all_of && !has_all_of {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
}

/// The model's vocabulary as the grammars see it, and the factory that
/// compiles them. Built once per engine.
pub struct Grammars {
    factory: ParserFactory,
    /// The id the token trie treats as "the grammar may end here".
    end: u32,
    vocab: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .finish()
    }
}

impl Grammars {
    /// From what each token writes (`None`: a special token that writes
    /// no text, which no grammar matches) and an end-of-sequence id.
    pub fn new(texts: Vec<Option<Vec<u8>>>, end: u32) -> Result<Arc<Self>> {
        let vocab = texts.len();
        if end as usize >= vocab {
            return Err(EngineError::Sampling(format!(
                "end-of-sequence id {end} is outside the vocabulary of {vocab}"
            )));
        }
        // Special tokens start with the trie's marker byte, which no text
        // contains, so grammars never produce them.
        let words: Vec<Vec<u8>> = texts
            .into_iter()
            .enumerate()
            .map(|(id, t)| match t {
                Some(t) if !t.is_empty() => t,
                _ => {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(format!("<special {id}>").as_bytes());
                    w
                }
            })
            .collect();
        let info = TokRxInfo::new(vocab as u32, end);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::Sampling(format!("building the grammar factory: {e}")))?;
        factory.quiet();
        Ok(Arc::new(Self {
            factory,
            end,
            vocab,
        }))
    }

    /// From a model's tokenizer: its special tokens write no text.
    pub fn from_tokenizer(tok: &tandem_model::tokenizer::Tokenizer) -> Result<Arc<Self>> {
        let end = tok.eos_ids().first().copied().ok_or_else(|| {
            EngineError::Unsupported("guided decoding needs an end-of-sequence token".into())
        })?;
        let texts = (0..tok.vocab_size() as u32)
            .map(|id| {
                (!tok.is_special(id))
                    .then(|| tok.token_bytes(id).map(<[u8]>::to_vec))
                    .flatten()
            })
            .collect();
        Self::new(texts, end)
    }

    /// The guide of a request asking for `format`, advanced past the
    /// tokens it already generated; `None` for free text. Without
    /// `grammars` (an engine started without the vocabulary), a request
    /// that asks for a format is refused.
    pub fn guide_for(
        grammars: Option<&Grammars>,
        format: &ResponseFormat,
        generated: &[u32],
    ) -> Result<Option<Guide>> {
        match grammars {
            Some(g) => g.guide(format, generated),
            None if format.is_text() => Ok(None),
            None => Err(EngineError::Unsupported(
                "guided decoding (response_format) needs the model's vocabulary; this engine was started without it".into(),
            )),
        }
    }

    /// The guide of a request asking for `format`, advanced past the
    /// tokens it already generated; `None` for free text.
    pub fn guide(&self, format: &ResponseFormat, generated: &[u32]) -> Result<Option<Guide>> {
        let Some(grammar) = format.grammar()? else {
            return Ok(None);
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| format_error(&e.to_string()))?;
        let mut guide = Guide {
            matcher: Matcher::new(Ok(parser)),
            end: self.end,
            vocab: self.vocab,
            mask: None,
        };
        for &t in generated {
            guide.advance(t)?;
        }
        // A grammar the parser cannot run (too large a row, say) fails its
        // first mask: better at admission, as the client's error, than as
        // a failed stream. The mask is kept for the first position.
        guide.mask = Some(
            guide
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| format_error(&e.to_string()))?,
        );
        Ok(Some(guide))
    }
}

/// A client's error for a format the parser refuses: the parser's own
/// words on one line, without the dump of its state that may follow them.
fn format_error(parser: &str) -> EngineError {
    let said = parser.split("<state>").next().unwrap_or_default();
    let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
    let why = match said.as_str() {
        "NoExtensionBias" | "NoExtension" => {
            "no output can match it (a schema or pattern that admits no text)".to_string()
        }
        "" => "the grammar parser refused it".to_string(),
        _ => said,
    };
    EngineError::Sampling(format!("invalid response format: {why}"))
}

/// One request's place in its grammar.
pub struct Guide {
    matcher: Matcher,
    end: u32,
    vocab: usize,
    /// The mask of the current position, when already computed (at
    /// admission); cleared by every token consumed.
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Clone for Guide {
    /// An independent copy (a parallel choice forks its own).
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            end: self.end,
            vocab: self.vocab,
            mask: self.mask.clone(),
        }
    }
}

fn guide_error(e: impl std::fmt::Display) -> EngineError {
    EngineError::Sampling(format!("guided decoding: {e}"))
}

impl Guide {
    /// `allowed[id]` for the next position: what keeps the output inside
    /// the grammar, and `stop`'s ids where the grammar may end. Ids past
    /// the tokenizer's vocabulary (padding rows of the model) are never
    /// allowed.
    pub fn allowed(&mut self, stop: &[u32]) -> Result<Vec<bool>> {
        let mask = match self.mask.take() {
            Some(m) => m,
            None => self.matcher.compute_mask_or_eos().map_err(guide_error)?,
        };
        let may_end = mask.is_allowed(self.end);
        let mut allowed: Vec<bool> = (0..self.vocab as u32)
            .map(|id| mask.is_allowed(id))
            .collect();
        // The trie's end id stands for "may end"; the request's own stop
        // tokens are what ends it.
        allowed[self.end as usize] = false;
        for &s in stop {
            if let Some(a) = allowed.get_mut(s as usize) {
                *a = may_end;
            }
        }
        Ok(allowed)
    }

    /// [`Guide::allowed`] for a sampler: `None` when nothing may come next
    /// (a finished grammar and no stop token to end on), which ends the
    /// sequence there.
    pub fn next_allowed(&mut self, stop: &[u32]) -> Result<Option<Vec<bool>>> {
        let allowed = self.allowed(stop)?;
        Ok(allowed.contains(&true).then_some(allowed))
    }

    /// Moves past `token` (one that [`Guide::allowed`] allowed, or one of a
    /// resumed request's tokens).
    pub fn advance(&mut self, token: u32) -> Result<()> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(guide_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level vocabulary: every ASCII character, a few words,
    /// and a special end token.
    fn grammars() -> (Arc<Grammars>, Vec<String>, u32) {
        let mut words: Vec<String> = (32u8..127).map(|b| (b as char).to_string()).collect();
        words.extend(["\n", "{\"", "\":", "true", "name", "\"}"].map(String::from));
        let end = words.len() as u32;
        let mut texts: Vec<Option<Vec<u8>>> =
            words.iter().map(|w| Some(w.as_bytes().to_vec())).collect();
        texts.push(None);
        words.push("<end>".into());
        (Grammars::new(texts, end).unwrap(), words, end)
    }

    fn id(words: &[String], w: &str) -> u32 {
        words.iter().position(|x| x == w).unwrap() as u32
    }

    /// Writes `text` greedily by the longest allowed token, checking each
    /// is allowed, then says whether the stop token is allowed.
    fn write(g: &mut Guide, words: &[String], text: &str, stop: u32) -> bool {
        let mut rest = text;
        while !rest.is_empty() {
            let allowed = g.allowed(&[stop]).unwrap();
            let (tok, w) = words
                .iter()
                .enumerate()
                .filter(|(i, w)| allowed[*i] && !w.is_empty() && rest.starts_with(w.as_str()))
                .max_by_key(|(_, w)| w.len())
                .unwrap_or_else(|| panic!("nothing allowed at {rest:?} of {text:?}"));
            g.advance(tok as u32).unwrap();
            rest = &rest[w.len()..];
        }
        g.allowed(&[stop]).unwrap()[stop as usize]
    }

    #[test]
    fn json_object_mode_allows_json_and_ends_only_after_a_whole_object() {
        let (gr, words, end) = grammars();
        let mut g = gr.guide(&ResponseFormat::JsonObject, &[]).unwrap().unwrap();
        let first = g.allowed(&[end]).unwrap();
        assert!(first[id(&words, "{") as usize]);
        assert!(first[id(&words, "{\"") as usize]);
        assert!(!first[id(&words, "x") as usize]);
        assert!(
            !first[id(&words, "[") as usize],
            "the top level is an object"
        );
        assert!(!first[end as usize]);
        assert!(!write(&mut g, &words, "{\"a\": [1, 2.5, true", end));
        assert!(write(&mut g, &words, "], \"b\": {}}", end));
        // A gap between tokens is one space, or one line break and a
        // bounded indent.
        let mut g = gr.guide(&ResponseFormat::JsonObject, &[]).unwrap().unwrap();
        write(&mut g, &words, "{ ", end);
        let allowed = g.allowed(&[end]).unwrap();
        assert!(!allowed[id(&words, " ") as usize] && !allowed[id(&words, "\n") as usize]);
        assert!(allowed[id(&words, "}") as usize]);
        let mut g = gr.guide(&ResponseFormat::JsonObject, &[]).unwrap().unwrap();
        let indent = " ".repeat(MAX_JSON_INDENT);
        write(&mut g, &words, &format!("{{\n{indent}"), end);
        let allowed = g.allowed(&[end]).unwrap();
        assert!(!allowed[id(&words, " ") as usize] && !allowed[id(&words, "\n") as usize]);
        assert!(allowed[id(&words, "}") as usize] && allowed[id(&words, "\"") as usize]);
        // Free text has no guide.
        assert!(gr.guide(&ResponseFormat::Text, &[]).unwrap().is_none());
    }

    #[test]
    fn a_schema_holds_keys_and_types() {
        let (gr, words, end) = grammars();
        let schema = r#"{"type": "object", "properties": {"name": {"type": "string"},
            "ok": {"type": "boolean"}}, "required": ["name", "ok"], "additionalProperties": false}"#;
        let format = ResponseFormat::JsonSchema(schema.into());
        let mut g = gr.guide(&format, &[]).unwrap().unwrap();
        assert!(!write(&mut g, &words, "{\"name\": \"Ada\", \"ok\": ", end));
        // A boolean only.
        let allowed = g.allowed(&[end]).unwrap();
        assert!(allowed[id(&words, "t") as usize] && allowed[id(&words, "true") as usize]);
        assert!(!allowed[id(&words, "1") as usize] && !allowed[id(&words, "\"") as usize]);
        assert!(write(&mut g, &words, "true}", end));
        // A missing required key cannot be closed.
        let mut g = gr.guide(&format, &[]).unwrap().unwrap();
        write(&mut g, &words, "{\"name\": \"x\"", end);
        assert!(!g.allowed(&[end]).unwrap()[id(&words, "}") as usize]);
    }

    /// Objects that list their properties admit no others unless they say
    /// so; the rewrite reads schema keywords, not property names.
    #[test]
    fn objects_that_list_properties_are_closed() {
        use serde_json::json;
        let mut s = json!({"type": "object", "properties": {
            "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
            "open": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "list": {"type": "array", "items": {"properties": {"b": {}}}},
            "either": {"anyOf": [{"properties": {"c": {}}}, {"type": "string"}]},
            "both": {"allOf": [{"properties": {"d": {}}}, {"properties": {"e": {}}}]},
            "data": {"const": {"properties": {"x": 1}}}
        }, "$defs": {"T": {"properties": {"f": {}}}}});
        close_objects(&mut s, false);
        let closed = |p: &str| s.pointer(p).unwrap_or(&serde_json::Value::Null).clone();
        assert_eq!(closed("/additionalProperties"), json!(false));
        assert_eq!(
            closed("/properties/properties/additionalProperties"),
            json!(false)
        );
        assert!(closed("/properties/properties/properties/additionalProperties").is_null());
        assert_eq!(
            closed("/properties/open/additionalProperties"),
            json!({"type": "string"})
        );
        assert_eq!(
            closed("/properties/list/items/additionalProperties"),
            json!(false)
        );
        assert_eq!(
            closed("/properties/either/anyOf/0/additionalProperties"),
            json!(false)
        );
        assert!(closed("/properties/both/allOf/0/additionalProperties").is_null());
        assert!(closed("/properties/data/const/additionalProperties").is_null());
        assert_eq!(closed("/$defs/T/additionalProperties"), json!(false));

        // Held to: nothing after the last listed key, and `{}` only for an
        // object that lists none (a function without parameters).
        let (gr, words, end) = grammars();
        let schema_guide = |schema: &str| {
            gr.guide(&ResponseFormat::JsonSchema(schema.into()), &[])
                .unwrap()
                .unwrap()
        };
        let city = r#"{"type": "object", "properties": {"city": {"type": "string"}}}"#;
        let mut g = schema_guide(city);
        write(&mut g, &words, "{\"city\": \"x\"", end);
        let allowed = g.allowed(&[end]).unwrap();
        assert!(allowed[id(&words, "}") as usize] && !allowed[id(&words, ",") as usize]);
        let none = r#"{"type": "object", "properties": {}}"#;
        let mut g = schema_guide(none);
        write(&mut g, &words, "{", end);
        let allowed = g.allowed(&[end]).unwrap();
        assert!(allowed[id(&words, "}") as usize] && !allowed[id(&words, "\"") as usize]);
        assert!(!allowed[id(&words, "{\"") as usize]);
        // JSON mode is any object still.
        let mut g = gr.guide(&ResponseFormat::JsonObject, &[]).unwrap().unwrap();
        assert!(write(&mut g, &words, "{\"zz\": 1}", end));
    }

    /// A format the parser refuses is a one-line error that says why, not
    /// a dump of the parser's state.
    #[test]
    fn refused_formats_say_why_in_one_line() {
        let (gr, _, _) = grammars();
        for format in [
            ResponseFormat::JsonSchema(r##"{"$ref": "#"}"##.into()),
            ResponseFormat::JsonSchema(r#"{"type": "nonsense"}"#.into()),
            ResponseFormat::Regex("(".into()),
        ] {
            let Err(e) = gr.guide(&format, &[]) else {
                panic!("{format:?} was accepted");
            };
            let msg = e.to_string();
            assert!(!msg.contains('\n') && !msg.contains("<state>"), "{msg}");
            assert!(msg.contains("invalid response format: "), "{msg}");
            assert!(msg.len() > "invalid response format: ".len() + 5, "{msg}");
        }
        // The parser's detail is kept.
        let e = gr
            .guide(&ResponseFormat::Regex("(((".into()), &[])
            .err()
            .unwrap();
        assert!(e.to_string().contains("unclosed group"), "{e}");
    }

    #[test]
    fn a_resumed_guide_continues_where_the_tokens_left_it() {
        let (gr, words, end) = grammars();
        let toks: Vec<u32> = ["{\"", "name", "\":"]
            .iter()
            .map(|w| id(&words, w))
            .collect();
        let mut g = gr
            .guide(&ResponseFormat::JsonObject, &toks)
            .unwrap()
            .unwrap();
        let allowed = g.allowed(&[end]).unwrap();
        assert!(allowed[id(&words, "true") as usize]);
        assert!(!allowed[id(&words, "}") as usize]);
        // A forked copy moves on its own.
        let mut fork = g.clone();
        fork.advance(id(&words, "1")).unwrap();
        assert!(!g.allowed(&[end]).unwrap()[id(&words, "}") as usize]);
        assert!(fork.allowed(&[end]).unwrap()[id(&words, "}") as usize]);
        // Tokens the grammar refuses are an error, not a silent skip.
        assert!(gr
            .guide(&ResponseFormat::JsonObject, &[id(&words, "x")])
            .is_err());
    }

    #[test]
    fn regexes_and_choices_hold_the_whole_text() {
        let (gr, words, end) = grammars();
        let phone = ResponseFormat::Regex(r"\d{3}-\d{4}".into());
        let mut g = gr.guide(&phone, &[]).unwrap().unwrap();
        let allowed = g.allowed(&[end]).unwrap();
        assert!(allowed[id(&words, "5") as usize] && !allowed[id(&words, "-") as usize]);
        assert!(!write(&mut g, &words, "555-12", end));
        assert!(write(&mut g, &words, "34", end));
        // Nothing but the end after the last digit.
        assert_eq!(g.allowed(&[end]).unwrap().iter().filter(|&&a| a).count(), 1);

        let choice = ResponseFormat::Choice(vec!["yes".into(), "no".into(), "a \"q\"".into()]);
        let mut g = gr.guide(&choice, &[]).unwrap().unwrap();
        let allowed = g.allowed(&[end]).unwrap();
        let firsts: Vec<&str> = words
            .iter()
            .enumerate()
            .filter(|(i, _)| allowed[*i])
            .map(|(_, w)| w.as_str())
            .collect();
        assert_eq!(firsts, ["a", "n", "y"]);
        assert!(write(&mut g, &words, "no", end));
        let mut g = gr.guide(&choice, &[]).unwrap().unwrap();
        assert!(write(&mut g, &words, "a \"q\"", end));
        assert!(gr.guide(&ResponseFormat::Choice(vec![]), &[]).is_err());
        // Thousands of options, with regex metacharacters in them.
        let many: Vec<String> = (0..5000).map(|i| format!("o{i}.*")).collect();
        let mut g = gr
            .guide(&ResponseFormat::Choice(many), &[])
            .unwrap()
            .unwrap();
        assert!(write(&mut g, &words, "o4999.*", end));
        let mut g = gr
            .guide(&ResponseFormat::Choice(vec!["a.c".into()]), &[])
            .unwrap()
            .unwrap();
        write(&mut g, &words, "a", end);
        let allowed = g.allowed(&[end]).unwrap();
        assert!(allowed[id(&words, ".") as usize] && !allowed[id(&words, "b") as usize]);
        assert!(gr.guide(&ResponseFormat::Regex("(".into()), &[]).is_err());
    }

    #[test]
    fn bad_schemas_are_clear_errors() {
        let (gr, _, _) = grammars();
        for bad in ["{not json", "42", r#"{"type": "no-such-type"}"#] {
            let e = gr
                .guide(&ResponseFormat::JsonSchema(bad.into()), &[])
                .unwrap_err();
            assert!(matches!(e, EngineError::Sampling(_)), "{bad}: {e}");
        }
    }
}
