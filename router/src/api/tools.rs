//! Tool calling (OpenAI's `tools` and `tool_choice` on chat) by guided
//! decoding, as vLLM does it for a forced choice: the output is held to the
//! JSON a call needs, so every model can call tools, whatever format it was
//! trained on, and the calls always parse.
//!
//! * a named function (`{"type": "function", "function": {"name": …}}`):
//!   the output is that function's `arguments`, held to its `parameters`
//!   schema, and streams as the call's `arguments`;
//! * `"required"`: the output is a JSON array of one or more
//!   `{"name", "arguments"}` (one when `parallel_tool_calls` is false),
//!   each held to its function's schema, sent as the calls once complete;
//! * `"none"`: plain text (the tools still reach the chat template);
//! * `"auto"` (OpenAI's default when tools are given) lets the model choose
//!   between text and calls written in its own format ([`CallFormat`]),
//!   read where the chat template teaches one tandem knows; with other
//!   templates "auto" is refused with a 400 that says what to send instead.
//!
//! The tools go to the chat template as `tools`, as transformers passes
//! them, for templates that describe them to the model.

use serde_json::{json, Map, Value};

use super::openai::{field, wrong_type};
use super::ApiError;

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Text, as without tools.
    None,
    /// A call of this function, and nothing else.
    Named(String),
    /// One call or more (`parallel`) of any of the functions.
    Required { parallel: bool },
    /// Text, calls in the model's format, or both: the model decides.
    Auto(CallFormat),
}

/// The Hermes format's call delimiters.
pub const CALL_OPEN: &str = "<tool_call>";
pub const CALL_CLOSE: &str = "</tool_call>";

/// How a model family writes the calls it chooses to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// `<tool_call>{"name": …, "arguments": …}</tool_call>` blocks, after
    /// any text (Hermes, Qwen 2.5).
    Hermes,
    /// The whole output is a call: `{"name": …, "parameters": …}`, several
    /// separated by `;` (Llama 3.1 to 3.3's JSON tool calls; the
    /// `<|python_tag|>` before them is a control token, which the
    /// detokeniser skips).
    Llama3Json,
}

impl CallFormat {
    /// The format a chat template teaches the model, if tandem knows it.
    pub fn of_template(source: &str) -> Option<Self> {
        if source.contains(CALL_OPEN) {
            Some(Self::Hermes)
        } else if source.contains("<|python_tag|>")
            || source.contains("\"parameters\": dictionary of argument name")
        {
            Some(Self::Llama3Json)
        } else {
            None
        }
    }

    /// Where a call begins in `text` (output not sent yet), if it does;
    /// `prose`: text went out before it.
    fn call_start(self, text: &str, prose: bool) -> Option<usize> {
        match self {
            Self::Hermes => text.find(CALL_OPEN),
            Self::Llama3Json => (!prose && text.trim_start().starts_with('{')).then_some(0),
        }
    }

    /// How much of `text` (no call begins in it) can go out as content
    /// now: all but what may still turn out to begin one.
    fn settled(self, text: &str, prose: bool) -> usize {
        match self {
            Self::Hermes => (1..CALL_OPEN.len())
                .rev()
                .find(|&k| text.ends_with(&CALL_OPEN[..k]))
                .map_or(text.len(), |k| text.len() - k),
            Self::Llama3Json if prose || !text.trim().is_empty() => text.len(),
            Self::Llama3Json => 0,
        }
    }
}

/// What a finished output says: text before any call, and the calls as
/// `(function name, arguments JSON)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub content: Option<String>,
    pub calls: Vec<(String, String)>,
}

/// A request's tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The `tools` array as given, for the chat template.
    pub defs: Value,
    /// `(name, parameters schema)` per function, in order.
    functions: Vec<(String, Value)>,
    pub choice: ToolChoice,
}

/// Longest function name OpenAI accepts (`^[a-zA-Z0-9_-]{1,64}$`).
const MAX_NAME: usize = 64;

/// Reads `tools`, `tool_choice` and `parallel_tool_calls`. `None` when the
/// request has no tools. `format`: how the model writes calls (from its
/// chat template), without which `"auto"` cannot be served.
pub fn parse(
    m: &Map<String, Value>,
    format: Option<CallFormat>,
) -> Result<Option<Tools>, ApiError> {
    let choice = field(m, "tool_choice");
    let Some(tools) = field(m, "tools") else {
        return match choice {
            None => Ok(None),
            Some(Value::String(s)) if s == "none" => Ok(None),
            Some(_) => Err(ApiError::bad_param(
                "tool_choice",
                "'tool_choice' needs 'tools' to choose from",
            )),
        };
    };
    let arr = tools
        .as_array()
        .ok_or_else(|| wrong_type("tools", "an array", tools))?;
    if arr.is_empty() {
        return Err(ApiError::bad_param("tools", "'tools' must not be empty"));
    }
    let mut functions: Vec<(String, Value)> = Vec::with_capacity(arr.len());
    for (i, t) in arr.iter().enumerate() {
        let p = format!("tools[{i}]");
        let o = t
            .as_object()
            .ok_or_else(|| wrong_type(&p, "an object", t))?;
        if o.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::bad_param(
                &format!("{p}.type"),
                format!("'{p}.type' must be \"function\""),
            ));
        }
        let fp = format!("{p}.function");
        let f = o
            .get("function")
            .and_then(Value::as_object)
            .ok_or_else(|| ApiError::bad_param(&fp, format!("'{fp}' must be an object")))?;
        let np = format!("{fp}.name");
        let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
        let valid = (1..=MAX_NAME).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(ApiError::bad_param(
                &np,
                format!("'{np}' must be 1 to {MAX_NAME} letters, digits, '_' or '-'"),
            ));
        }
        if functions.iter().any(|(n, _)| n == name) {
            return Err(ApiError::bad_param(
                &np,
                format!("function '{name}' is defined twice"),
            ));
        }
        let pp = format!("{fp}.parameters");
        let params = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            // Arguments are an object: a schema without a type (`{}`
            // included) describes one.
            Some(Value::Object(o)) => match o.get("type") {
                None => {
                    let mut o = o.clone();
                    o.insert("type".into(), json!("object"));
                    Value::Object(o)
                }
                Some(t) if t == "object" => Value::Object(o.clone()),
                Some(t) => {
                    return Err(ApiError::bad_param(
                        &pp,
                        format!(
                            "'{pp}' must describe an object (\"type\": \"object\"), got type {t}"
                        ),
                    ))
                }
            },
            Some(v) => return Err(wrong_type(&pp, "an object", v)),
        };
        functions.push((name.to_string(), params));
    }
    let parallel = match field(m, "parallel_tool_calls") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(wrong_type("parallel_tool_calls", "a boolean", v)),
    };
    let choice = match choice {
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required { parallel },
        None => ToolChoice::Auto(format.ok_or_else(auto_refused)?),
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto(format.ok_or_else(auto_refused)?),
        Some(Value::String(s)) => {
            return Err(ApiError::bad_param(
                "tool_choice",
                format!(
                "'tool_choice' must be \"none\", \"auto\", \"required\" or an object, got '{s}'"
            ),
            ))
        }
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::bad_param(
                        "tool_choice",
                        "'tool_choice' must be \"none\", \"auto\", \"required\" or \
                         {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !functions.iter().any(|(n, _)| n == name) {
                return Err(ApiError::bad_param(
                    "tool_choice",
                    format!("'tool_choice' names function '{name}', which 'tools' does not define"),
                ));
            }
            ToolChoice::Named(name.to_string())
        }
        Some(v) => {
            return Err(wrong_type(
                "tool_choice",
                "\"none\", \"auto\", \"required\" or an object",
                v,
            ))
        }
    };
    Ok(Some(Tools {
        defs: tools.clone(),
        functions,
        choice,
    }))
}

fn auto_refused() -> ApiError {
    ApiError::unsupported(
        "tool_choice",
        " as \"auto\", the default when 'tools' are given, for this model (its chat \
         template does not write calls in a format tandem reads): send \"required\" or \
         {\"type\": \"function\", \"function\": {\"name\": ...}} to have a call, or \
         \"none\" for text",
    )
}

impl Tools {
    /// Whether the output may be a call (not text alone).
    pub fn calls(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// Whether the output is a call and nothing else (no text content).
    pub fn forced(&self) -> bool {
        matches!(
            self.choice,
            ToolChoice::Required { .. } | ToolChoice::Named(_)
        )
    }

    /// The JSON schema (as text) the output is held to, when it is a call.
    pub fn schema(&self) -> Option<String> {
        let params = |name: &str| {
            self.functions
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| json!({"type": "object"}))
        };
        let schema = match &self.choice {
            ToolChoice::None | ToolChoice::Auto(_) => return None,
            ToolChoice::Named(name) => params(name),
            ToolChoice::Required { parallel } => {
                let one: Vec<Value> = self
                    .functions
                    .iter()
                    .map(|(name, p)| {
                        json!({
                            "type": "object",
                            "properties": {"name": {"const": name}, "arguments": p},
                            "required": ["name", "arguments"],
                            "additionalProperties": false,
                        })
                    })
                    .collect();
                let mut s = json!({"type": "array", "minItems": 1, "items": {"anyOf": one}});
                if !parallel {
                    s["maxItems"] = json!(1);
                }
                s
            }
        };
        Some(schema.to_string())
    }

    /// The calls in a finished output. A named call's output is its
    /// arguments, whole or not (a completion cut by `max_tokens` keeps what
    /// it wrote, as OpenAI's does); a required one's is parsed; an auto
    /// one's is in the model's format ([`CallFormat`]). `None` when there
    /// is no call, or what should be one does not parse (cut short): the
    /// text then goes out as content.
    pub fn parse_calls(&self, text: &str) -> Option<Output> {
        // Llama names the arguments `parameters`.
        let calls = |v: &[Value]| -> Option<Vec<(String, String)>> {
            v.iter()
                .map(|c| {
                    let name = c.get("name")?.as_str()?.to_string();
                    let args = c.get("arguments").or_else(|| c.get("parameters"))?;
                    Some((name, args.to_string()))
                })
                .collect()
        };
        match &self.choice {
            ToolChoice::None => None,
            ToolChoice::Named(name) => Some(Output {
                content: None,
                calls: vec![(name.clone(), text.to_string())],
            }),
            ToolChoice::Required { .. } => match serde_json::from_str::<Value>(text) {
                Ok(Value::Array(items)) => {
                    // The arguments as the model wrote them (what streaming
                    // sent), where they read as the parsed calls do; else
                    // the parsed ones, serialised.
                    let parsed = calls(&items)?;
                    let written = scanned_calls(text);
                    let same = written.len() == parsed.len()
                        && written.iter().zip(&parsed).all(|(w, p)| {
                            w.0 == p.0
                                && serde_json::from_str::<Value>(&w.1).ok()
                                    == serde_json::from_str::<Value>(&p.1).ok()
                        });
                    Some(Output {
                        content: None,
                        calls: if same { written } else { parsed },
                    })
                }
                Ok(_) => None,
                // A list cut short (by `max_tokens`): its calls as far as
                // they were written, the last one's arguments cut as a
                // named call's are (what streaming sent); none at all if
                // no name was written.
                Err(_) => Some(Output {
                    content: None,
                    calls: scanned_calls(text),
                }),
            },
            ToolChoice::Auto(CallFormat::Hermes) => {
                let at = text.find(CALL_OPEN)?;
                let blocks = hermes_blocks(&text[at..])?;
                let content = text[..at].trim();
                Some(Output {
                    content: (!content.is_empty()).then(|| content.to_string()),
                    calls: calls(&blocks)?,
                })
            }
            ToolChoice::Auto(CallFormat::Llama3Json) => Some(Output {
                content: None,
                calls: calls(&json_objects(text)?)?,
            }),
        }
    }

    /// The function a named choice calls.
    pub fn named(&self) -> Option<&str> {
        match &self.choice {
            ToolChoice::Named(n) => Some(n),
            _ => None,
        }
    }
}

/// The calls of a required choice's output as [`CallScanner`] reads them
/// while streaming: each name, and its arguments' text as written.
fn scanned_calls(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for piece in CallScanner::default().push(text) {
        match piece {
            CallPiece::Start { name, .. } => out.push((name, String::new())),
            CallPiece::Args { index, text } => out[index].1.push_str(&text),
        }
    }
    out
}

/// The JSON of each `<tool_call>…</tool_call>` in `text` (which starts
/// with one); the last may lack its closing tag (the model stopped right
/// after it). `None` if anything else is there, or a call is not JSON.
fn hermes_blocks(mut text: &str) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    loop {
        text = text.trim_start();
        if text.is_empty() {
            return Some(out);
        }
        let body = text.strip_prefix(CALL_OPEN)?;
        let (json, rest) = body.split_once(CALL_CLOSE).unwrap_or((body, ""));
        out.push(serde_json::from_str(json.trim()).ok()?);
        text = rest;
    }
}

/// The JSON objects `text` consists of, separated by `;` (Llama's calls).
/// `None` if anything else is there.
fn json_objects(text: &str) -> Option<Vec<Value>> {
    let mut out = Vec::new();
    let mut rest = text.trim_start();
    if !rest.starts_with('{') {
        return None;
    }
    while !rest.is_empty() {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        if !v.is_object() {
            return None;
        }
        out.push(v);
        rest = rest[values.byte_offset()..].trim_start();
        if let Some(next) = rest.strip_prefix(';') {
            rest = next.trim_start();
        }
    }
    Some(out)
}

/// A streamed tool-call choice's output, held back as far as a call may be
/// in it: a required call's until it is whole; an auto choice's from where
/// a call begins, or may yet begin, its text before that going out as it
/// comes.
#[derive(Debug, Default)]
pub struct CallStream {
    held: String,
    /// A call has begun: the rest is held.
    in_call: bool,
    /// Text went out as content.
    prose: bool,
}

impl CallStream {
    /// Takes the next piece of output; returns what goes out as content now.
    pub fn push(&mut self, tools: &Tools, text: &str) -> String {
        self.held.push_str(text);
        let ToolChoice::Auto(format) = tools.choice else {
            return String::new();
        };
        if self.in_call {
            return String::new();
        }
        let n = match format.call_start(&self.held, self.prose) {
            Some(at) => {
                self.in_call = true;
                at
            }
            None => format.settled(&self.held, self.prose),
        };
        let out: String = self.held.drain(..n).collect();
        self.prose |= !out.is_empty();
        out
    }

    /// At the end: the content not sent yet, and the calls, if the output
    /// holds any that parse (if not, all of it is content).
    pub fn finish(&mut self, tools: &Tools) -> (String, Option<Vec<(String, String)>>) {
        let whole = std::mem::take(&mut self.held);
        let at = match tools.choice {
            ToolChoice::Auto(format) if !self.in_call => {
                format.call_start(&whole, self.prose).unwrap_or(whole.len())
            }
            _ => 0,
        };
        let (text, rest) = whole.split_at(at);
        match tools.parse_calls(rest) {
            Some(out) if !out.calls.is_empty() => (text.to_string(), Some(out.calls)),
            // A required choice's output is calls, never text.
            Some(_) if matches!(tools.choice, ToolChoice::Required { .. }) => (String::new(), None),
            _ => (whole, None),
        }
    }
}

/// A piece of a call list being written, for streaming it.
#[derive(Debug, Clone, PartialEq)]
pub enum CallPiece {
    /// Call `index` begins: its function's name is known.
    Start { index: usize, name: String },
    /// More of call `index`'s arguments JSON.
    Args { index: usize, text: String },
}

/// Reads calls as they are written (the `[{"name": …, "arguments": …}, …]`
/// of a required choice, or bare call objects), so that each call's name
/// goes out once known and its arguments as they come, as OpenAI streams
/// them. A call object is one at the top level or in a top-level array;
/// its `name` and its `arguments` (or `parameters`) are read in either
/// order (arguments wait for the name).
#[derive(Debug, Default)]
pub struct CallScanner {
    /// Open containers (`{` or `[`).
    stack: Vec<u8>,
    in_string: bool,
    escaped: bool,
    /// The depth of the call object being read.
    call_depth: Option<usize>,
    field: Field,
    /// The key, or the `name` value, being read (raw, with its quotes).
    token: String,
    name: Option<String>,
    /// Arguments not sent yet (all of them until the name is known).
    args: String,
    /// Whitespace after the arguments so far, sent only if more follows.
    trailing: String,
    started: usize,
    /// The current call's `Start` went out.
    open: bool,
}

#[derive(Debug, Default, Clone, PartialEq)]
enum Field {
    #[default]
    Key,
    InKey,
    Colon(String),
    Value(String),
    InName,
    /// Inside a value; `true` for the arguments.
    InValue(bool),
}

impl CallScanner {
    /// Calls begun so far.
    pub fn started(&self) -> usize {
        self.started
    }

    pub fn push(&mut self, text: &str) -> Vec<CallPiece> {
        let mut out = Vec::new();
        for c in text.chars() {
            self.step(c, &mut out);
        }
        self.flush(&mut out);
        // One piece per call and kind in a row.
        let mut merged: Vec<CallPiece> = Vec::with_capacity(out.len());
        for p in out {
            match (merged.last_mut(), p) {
                (
                    Some(CallPiece::Args { index: a, text }),
                    CallPiece::Args { index: b, text: t },
                ) if *a == b => text.push_str(&t),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    fn flush(&mut self, out: &mut Vec<CallPiece>) {
        if self.open && !self.args.is_empty() {
            out.push(CallPiece::Args {
                index: self.started - 1,
                text: std::mem::take(&mut self.args),
            });
        }
    }

    fn step(&mut self, c: char, out: &mut Vec<CallPiece>) {
        let depth = self.stack.len();
        let at_call = self.call_depth == Some(depth);
        // Characters of a value below the call object's own level.
        if let (Some(d), Field::InValue(args)) = (self.call_depth, &self.field) {
            let args = *args;
            if depth > d || self.in_string {
                self.lex(c);
                if args {
                    self.arg(c);
                }
                return;
            }
            // At the call's level: the value goes on or ends here.
            match c {
                ',' | '}' => {
                    self.trailing.clear();
                    self.field = Field::Key;
                }
                c if c.is_whitespace() => {
                    if args {
                        self.trailing.push(c);
                    }
                    return;
                }
                c => {
                    self.lex(c);
                    if args {
                        self.arg(c);
                    }
                    return;
                }
            }
        }
        if self.in_string {
            self.lex(c);
            if matches!(self.field, Field::InKey | Field::InName) {
                self.token.push(c);
            }
            if !self.in_string && at_call {
                let token = std::mem::take(&mut self.token);
                match self.field {
                    Field::InKey => {
                        let key = serde_json::from_str::<String>(&token).unwrap_or_default();
                        self.field = Field::Colon(key);
                    }
                    Field::InName => {
                        if let Ok(name) = serde_json::from_str::<String>(&token) {
                            self.begin(name, out);
                        }
                        self.field = Field::Value(String::new());
                    }
                    _ => {}
                }
            }
            return;
        }
        if at_call {
            match (&self.field, c) {
                (Field::Key, '"') => {
                    self.token.push(c);
                    self.field = Field::InKey;
                    self.lex(c);
                    return;
                }
                (Field::Colon(key), ':') => {
                    self.field = Field::Value(key.clone());
                    return;
                }
                // After the name's value.
                (Field::Value(key), ',') if key.is_empty() => {
                    self.field = Field::Key;
                    return;
                }
                (Field::Value(key), c) if !c.is_whitespace() && !key.is_empty() => {
                    let key = key.clone();
                    if key == "name" && c == '"' {
                        self.token.push(c);
                        self.field = Field::InName;
                        self.lex(c);
                        return;
                    }
                    let args = key == "arguments" || key == "parameters";
                    self.field = Field::InValue(args);
                    self.lex(c);
                    if args {
                        self.arg(c);
                    }
                    return;
                }
                _ => {}
            }
        }
        // Structure outside the fields of a call.
        let opens_call = c == '{'
            && !self.in_string
            && self.call_depth.is_none()
            && (self.stack.is_empty() || self.stack == [b'[']);
        self.lex(c);
        if opens_call {
            self.call_depth = Some(self.stack.len());
            self.field = Field::Key;
            self.name = None;
            self.open = false;
            self.args.clear();
            self.trailing.clear();
        } else if c == '}' && at_call {
            // The call is whole: what is left of its arguments goes now.
            self.flush(out);
            self.call_depth = None;
        }
    }

    /// Tracks strings and nesting.
    fn lex(&mut self, c: char) {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return;
        }
        match c {
            '"' => self.in_string = true,
            '{' => self.stack.push(b'{'),
            '[' => self.stack.push(b'['),
            '}' | ']' => {
                self.stack.pop();
            }
            _ => {}
        }
    }

    fn arg(&mut self, c: char) {
        let ws = std::mem::take(&mut self.trailing);
        self.args.push_str(&ws);
        self.args.push(c);
    }

    fn begin(&mut self, name: String, out: &mut Vec<CallPiece>) {
        if self.open {
            return;
        }
        self.name = Some(name.clone());
        self.open = true;
        self.started += 1;
        out.push(CallPiece::Start {
            index: self.started - 1,
            name,
        });
    }
}

/// OpenAI's `tool_calls` entries, with fresh ids; `index` for stream deltas.
pub fn calls_json(calls: &[(String, String)], with_index: bool) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| {
                let mut c = json!({
                    "id": call_id(),
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                });
                if with_index {
                    c["index"] = json!(i);
                }
                c
            })
            .collect(),
    )
}

/// A tool call's id, as OpenAI shapes them.
pub fn call_id() -> String {
    format!("call_{}", super::random_id())
}

/// An assistant turn's `tool_calls` for the chat template: checked, with
/// each call's `arguments` parsed from its JSON text into an object, as
/// transformers' templates expect (vLLM does the same).
pub fn history_calls(p: &str, v: &Value) -> Result<Value, ApiError> {
    let arr = v.as_array().ok_or_else(|| wrong_type(p, "an array", v))?;
    let mut out = Vec::with_capacity(arr.len());
    for (i, c) in arr.iter().enumerate() {
        let cp = format!("{p}[{i}]");
        let mut c = c.clone();
        let f = c
            .get_mut("function")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                ApiError::bad_param(&cp, format!("'{cp}.function' must be an object"))
            })?;
        if !f.get("name").is_some_and(Value::is_string) {
            return Err(ApiError::bad_param(
                &cp,
                format!("'{cp}.function.name' must be a string"),
            ));
        }
        if let Some(Value::String(args)) = f.get("arguments") {
            if let Ok(parsed) = serde_json::from_str::<Value>(args) {
                f.insert("arguments".into(), parsed);
            }
        }
        out.push(c);
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(format: CallFormat) -> Tools {
        Tools {
            defs: json!([]),
            functions: vec![("f".into(), json!({"type": "object"}))],
            choice: ToolChoice::Auto(format),
        }
    }

    #[test]
    fn hermes_calls_parse_with_or_without_text_and_closing_tags() {
        let t = auto(CallFormat::Hermes);
        let two = "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": {}}";
        assert_eq!(
            t.parse_calls(two),
            Some(Output {
                content: Some("Sure.".into()),
                calls: vec![("f".into(), r#"{"a":1}"#.into()), ("g".into(), "{}".into())],
            })
        );
        let bare = "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>";
        assert_eq!(t.parse_calls(bare).unwrap().content, None);
        // Not calls: no tag, text after a call, a call that is not JSON or
        // lacks its name or arguments.
        for text in [
            "plain text",
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> and more",
            "<tool_call>{\"name\": \"f\", \"argu",
            "<tool_call>{\"arguments\": {}}</tool_call>",
        ] {
            assert_eq!(t.parse_calls(text), None, "{text}");
        }
    }

    #[test]
    fn a_required_list_cut_short_keeps_its_calls_as_written() {
        let t = Tools {
            choice: ToolChoice::Required { parallel: true },
            ..auto(CallFormat::Hermes)
        };
        let call = r#"{"name": "f", "arguments": {"city": "Paris"}}"#;
        let calls = |text: &str| -> Vec<(String, Option<Value>)> {
            let out = t.parse_calls(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(out.content, None);
            out.calls
                .into_iter()
                .map(|(n, a)| (n, serde_json::from_str(&a).ok()))
                .collect()
        };
        let paris = || ("f".to_string(), Some(json!({"city": "Paris"})));
        assert_eq!(calls(&format!("[{call}, {call}]")), [paris(), paris()]);
        assert_eq!(
            calls(&format!(
                "[\n{call}\n\n,\n{call} ,\n{{\"name\": \"f\", \"argu"
            )),
            [paris(), paris(), ("f".to_string(), None)]
        );
        assert_eq!(calls(&format!("[{call},{call}")), [paris(), paris()]);
        // The last call's arguments as far as they go.
        let cut = t
            .parse_calls(r#"[{"name": "f", "arguments": {"ci"#)
            .unwrap();
        assert_eq!(cut.calls, [("f".to_string(), r#"{"ci"#.to_string())]);
        // No name written: no call, and no text either.
        for text in ["[", "[{\"na", ""] {
            assert_eq!(calls(text), [], "{text}");
        }
        for text in ["{}", "[{\"name\": 1, \"arguments\": {}}]"] {
            assert_eq!(t.parse_calls(text), None, "{text}");
        }
    }

    /// Calls stream as written: each name once known, the arguments as
    /// they come, whatever the pieces' boundaries; what the pieces add up
    /// to is the list's calls.
    #[test]
    fn a_call_list_streams_as_it_is_written() {
        let text = "[\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa\\\"ris\", \"n\": [1, {\"a\": \"}\"}]}  }\n, {\"arguments\": {}, \"name\": \"now\"}, {\"name\": \"x\", \"arguments\": null}]";
        let want: Vec<(String, String)> = {
            let v: Vec<Value> = serde_json::from_str(text).unwrap();
            v.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap().to_string(),
                        c["arguments"].to_string(),
                    )
                })
                .collect()
        };
        for size in [1, 2, 3, 7, 1000] {
            let mut scan = CallScanner::default();
            let chars: Vec<char> = text.chars().collect();
            let mut got: Vec<(String, String)> = Vec::new();
            let mut first_args_at = None;
            for (k, piece) in chars.chunks(size).enumerate() {
                for p in scan.push(&piece.iter().collect::<String>()) {
                    match p {
                        CallPiece::Start { index, name } => {
                            assert_eq!(index, got.len());
                            got.push((name, String::new()));
                        }
                        CallPiece::Args { index, text } => {
                            first_args_at.get_or_insert(k);
                            got[index].1.push_str(&text);
                        }
                    }
                }
            }
            assert_eq!(scan.started(), 3);
            let parsed: Vec<(String, String)> = got
                .iter()
                .map(|(n, a)| {
                    (
                        n.clone(),
                        serde_json::from_str::<Value>(a).unwrap().to_string(),
                    )
                })
                .collect();
            assert_eq!(parsed, want, "pieces of {size}");
            // Streamed: the first arguments went out long before the end.
            if size < 10 {
                assert!(first_args_at.unwrap() * size < text.len() / 2, "{size}");
            }
        }
    }

    #[test]
    fn parameters_describe_an_object() {
        let tools = |params: Value| {
            let mut m = Map::new();
            m.insert(
                "tools".into(),
                json!([{"type": "function", "function": {"name": "f", "parameters": params}}]),
            );
            m.insert("tool_choice".into(), json!("required"));
            parse(&m, None)
        };
        for typeless in [json!({}), json!({"properties": {"a": {"type": "string"}}})] {
            let t = tools(typeless.clone()).unwrap().unwrap();
            assert_eq!(t.functions[0].1["type"], "object", "{typeless}");
        }
        let e = tools(json!({"type": "string"})).unwrap_err();
        assert!(
            e.message.contains("must describe an object"),
            "{}",
            e.message
        );
    }

    #[test]
    fn llama_calls_are_the_whole_output() {
        let t = auto(CallFormat::Llama3Json);
        let two =
            " {\"name\": \"f\", \"parameters\": {\"a\": 1}}; {\"name\": \"g\", \"parameters\": {}}";
        assert_eq!(
            t.parse_calls(two),
            Some(Output {
                content: None,
                calls: vec![("f".into(), r#"{"a":1}"#.into()), ("g".into(), "{}".into())],
            })
        );
        for text in [
            "The answer is {\"name\": \"f\", \"parameters\": {}}",
            "{\"name\": \"f\", \"parameters\": {}} and text",
            "{\"name\": \"f\", \"param",
            "[1, 2]",
        ] {
            assert_eq!(t.parse_calls(text), None, "{text}");
        }
    }

    /// Streamed, text goes out as it comes up to a call, never a piece of
    /// what begins one; what is held comes out at the end, as calls if it
    /// parses, else as text.
    #[test]
    fn streams_hold_back_what_may_begin_a_call() {
        let run = |t: &Tools, pieces: &[&str]| {
            let mut s = CallStream::default();
            let sent: Vec<String> = pieces.iter().map(|p| s.push(t, p)).collect();
            (sent, s.finish(t))
        };
        let hermes = auto(CallFormat::Hermes);
        let (sent, (rest, calls)) = run(
            &hermes,
            &[
                "Sure",
                ". <tool",
                "_call>{\"name\": \"f\", ",
                "\"arguments\": {}}</tool_call>",
            ],
        );
        assert_eq!(sent, ["Sure", ". ", "", ""]);
        assert_eq!(rest, "");
        assert_eq!(calls, Some(vec![("f".into(), "{}".into())]));
        // `<tool` that turns out to be text is sent once it is clear.
        let (sent, (rest, calls)) = run(&hermes, &["a <tool", "box> b"]);
        assert_eq!(sent.concat() + &rest, "a <toolbox> b");
        assert_eq!(calls, None);
        let llama = auto(CallFormat::Llama3Json);
        let (sent, (rest, calls)) =
            run(&llama, &["  ", "{\"name\": \"f\",", " \"parameters\": {}}"]);
        assert_eq!(sent.concat() + &rest, "");
        assert_eq!(calls, Some(vec![("f".into(), "{}".into())]));
        // Text first: all text, even JSON later in it.
        let (sent, (rest, calls)) =
            run(&llama, &["Here: ", "{\"name\": \"f\", \"parameters\": {}}"]);
        assert_eq!(
            sent.concat() + &rest,
            "Here: {\"name\": \"f\", \"parameters\": {}}"
        );
        assert_eq!(calls, None);
        // A call cut short is text.
        let (sent, (rest, calls)) = run(&llama, &["{\"name\": \"f\", \"par"]);
        assert_eq!(
            (sent.concat() + &rest, calls),
            ("{\"name\": \"f\", \"par".into(), None)
        );
    }

    #[test]
    fn call_formats_are_recognised_from_templates() {
        let of = CallFormat::of_template;
        assert_eq!(
            of("... within <tool_call></tool_call> XML tags ..."),
            Some(CallFormat::Hermes)
        );
        assert_eq!(
            of("{{- '<|python_tag|>' + tool_call.name }}"),
            Some(CallFormat::Llama3Json)
        );
        assert_eq!(
            of("{% for m in messages %}{{ m.content }}{% endfor %}"),
            None
        );
    }
}
