//! Chat templates (Jinja, as Hugging Face writes them) rendered with minijinja.
//!
//! Models ship their prompt format as a Jinja template (GGUF
//! `tokenizer.chat_template`, or `chat_template` in `tokenizer_config.json`).
//! transformers renders it with jinja2 (`trim_blocks`, `lstrip_blocks`) plus a
//! few helpers of its own; this module sets minijinja up the same way so the
//! prompt text is byte-for-byte what `apply_chat_template(tokenize=False)`
//! produces:
//!
//! * Python string/dict methods (`.strip()`, `.split()`, `.items()`, …) via
//!   `minijinja_contrib::pycompat`;
//! * `raise_exception(msg)`, which templates use to reject conversations;
//! * `tojson` with Python's `json.dumps` formatting (`", "` and `": "`
//!   separators, no ASCII or HTML escaping, optional `indent`);
//! * `strftime_now(fmt)` (UTC);
//! * variables `messages`, `add_generation_prompt`, `bos_token`,
//!   `eos_token`, `tools` (the request's tool definitions, or `none`) and
//!   `documents` (`none`), like transformers.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::error::{ModelError, Result};

/// One turn of a conversation, as templates read it: `role` and
/// `content`, plus, on tool-calling turns, the assistant's `tool_calls`
/// (OpenAI's shape, `arguments` as an object, as transformers expects) or
/// the `tool_call_id` a tool's answer replies to. Absent fields are not
/// defined in the template at all, so `is defined` tests work.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template. Compiling happens once, in [`ChatTemplate::new`],
/// so a broken template is reported when the model loads, not per request.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_err(e: Error) -> ModelError {
    // minijinja keeps the cause (e.g. a failing filter) as the source.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ModelError::ChatTemplate(msg)
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers compiles with trim_blocks=True, lstrip_blocks=True.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(template_err)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            source: source.to_string(),
        })
    }

    /// The template's Jinja source (what it teaches the model, e.g. the
    /// format of its tool calls).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation; `add_generation_prompt` appends the assistant header.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`ChatTemplate::render`] with the tools the model may call (OpenAI's
    /// `tools` array: `{"type": "function", "function": {...}}` each), for
    /// templates that describe them to the model; others ignore them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => tools.map_or(Value::from(()), Value::from_serialize),
            documents => Value::from(()),
        })
        .map_err(template_err)
    }
}

/// `raise_exception(msg)`: the template refuses the conversation.
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// `x | tojson(indent=None, ensure_ascii=False, sort_keys=False)` formatted
/// like Python's `json.dumps`, which transformers uses.
fn tojson(
    value: Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v.clone()).map_err(|_| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: indent must be a non-negative integer, got {v}"),
            )
        })?),
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, 0, ensure_ascii, sort_keys, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    depth: usize,
    ensure_ascii: bool,
    sort_keys: bool,
    out: &mut String,
) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // Python: (", ", ": ") without indent, (",", ": ") with it.
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else if f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&format!("{f}"));
                }
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or_default(), ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match k.as_str() {
                    Some(s) => write_json_str(s, ensure_ascii, out),
                    None => write_json_str(&k.to_string(), ensure_ascii, out),
                }
                out.push_str(": ");
                let item = v.get_item(k)?;
                write_json(&item, indent, depth + 1, ensure_ascii, sort_keys, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, depth + 1, ensure_ascii, sort_keys, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize {}", v.kind()),
            ));
        }
    }
    Ok(())
}

/// `strftime_now(fmt)`: the current time (UTC) formatted with the usual
/// strftime directives (Llama 3.x templates put today's date in the system
/// prompt this way).
fn strftime_now(fmt: String) -> std::result::Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(&fmt, secs)))
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31) (Howard Hinnant's
/// civil_from_days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let is_leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + u32::from(is_leap && m > 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('-') => match chars.next() {
                // glibc's "no padding" flag, e.g. %-d.
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some('H') => out.push_str(&hh.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        template: String,
        bos_token: String,
        eos_token: String,
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
        expected: Option<String>,
        error: Option<String>,
    }

    fn load_cases() -> Vec<Case> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fixtures/tokenizer/chat_smollm2.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        serde_json::from_value(v["cases"].clone()).unwrap()
    }

    #[test]
    fn matches_transformers_renderings() {
        let cases = load_cases();
        assert!(cases.len() >= 8, "fixture has too few cases");
        assert!(
            cases.iter().any(|c| c.error.is_some()),
            "fixture should have a raising case"
        );
        for c in &cases {
            let t = ChatTemplate::new(&c.template, &c.bos_token, &c.eos_token).unwrap();
            let got = t.render(&c.messages, c.add_generation_prompt);
            match (&c.expected, &c.error, got) {
                (Some(want), _, Ok(got)) => assert_eq!(&got, want, "{}", c.name),
                (_, Some(err), Err(ModelError::ChatTemplate(msg))) => {
                    assert!(
                        msg.contains(err.as_str()),
                        "{}: {msg:?} should contain {err:?}",
                        c.name
                    )
                }
                (_, _, got) => panic!("{}: unexpected result {got:?}", c.name),
            }
        }
    }

    /// Tools reach the template as `tools`; a tool-calling turn's calls and
    /// a tool's answer reach it as fields that exist only where given.
    #[test]
    fn tools_and_tool_turns_reach_the_template() {
        let src = "{% if tools %}[{% for t in tools %}{{ t.function.name }};{% endfor %}]{% endif %}\
            {% for m in messages %}{{ m.role }}:{% if m.tool_calls is defined %}\
            {% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}\
            {% else %}{{ m.content }}{% endif %}{% if m.tool_call_id is defined %}#{{ m.tool_call_id }}{% endif %}|{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ]));
        let mut answer = ChatMessage::new("tool", "sunny");
        answer.tool_call_id = Some("c1".into());
        let msgs = [ChatMessage::new("user", "Weather?"), call, answer];
        assert_eq!(
            t.render_with_tools(&msgs, Some(&tools), false).unwrap(),
            "[get_weather;]user:Weather?|assistant:get_weather({\"city\": \"Paris\"})|tool:sunny#c1|"
        );
        // Without tools, `tools` is none.
        assert!(t.render(&msgs[..1], false).unwrap().starts_with("user:"));
    }

    #[test]
    fn raise_exception_becomes_error() {
        let src = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "hi")], false).unwrap(),
            "hi"
        );
        match t.render(&[ChatMessage::new("system", "x")], false) {
            Err(ModelError::ChatTemplate(msg)) => {
                assert!(msg.contains("System role not supported"), "{msg}")
            }
            other => panic!("expected a chat template error, got {other:?}"),
        }
    }

    #[test]
    fn syntax_error_is_reported_at_compile_time() {
        match ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "") {
            Err(ModelError::ChatTemplate(msg)) => assert!(!msg.is_empty()),
            other => panic!("expected a chat template error, got {other:?}"),
        }
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }

    #[test]
    fn pycompat_and_tojson() {
        let src = "{{ messages[0].content.strip().split(',') | tojson }}|{{ {'a': 1, 'b': [1.5, none, true], 'c': 'é\"'} | tojson }}|{{ [1] | tojson(indent=2) }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let got = t
            .render(&[ChatMessage::new("user", "  x,y<z>  ")], false)
            .unwrap();
        assert_eq!(
            got,
            "[\"x\", \"y<z>\"]|{\"a\": 1, \"b\": [1.5, null, true], \"c\": \"é\\\"\"}|[\n  1\n]"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %p %j %%", t),
            "Friday July 26, 13:05:09 PM 208 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "")
            .unwrap()
            .render(&[], false)
            .unwrap();
        assert!(now.parse::<i32>().unwrap() >= 2024);
    }
}
