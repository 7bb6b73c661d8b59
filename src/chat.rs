//! Chat robots (DingTalk, WeCom, Feishu, Slack): their message bodies per each platform's
//! documented schema and size limit, mentions, keywords and signing, and how to read their
//! answers (most answer a refusal with HTTP 200 and an error code in the body).

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};

use crate::crd::{BodyFormat, Language};
use crate::secret::Sensitive;

/// What a webhook's robot needs beyond the rendered text: who to mention, a keyword the robot
/// requires, and the secret it signs with (DingTalk, Feishu).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Robot {
    /// Added to every message, test messages included (robots with a keyword refuse others).
    pub keyword: Option<String>,
    /// Mention everyone in the chat.
    pub mention_all: bool,
    /// User ids to mention.
    pub mention_users: Vec<String>,
    /// Mobile numbers to mention (DingTalk).
    pub mention_mobiles: Vec<String>,
    /// The robot's signing secret (DingTalk: URL query; Feishu: body).
    pub secret: Option<Sensitive<String>>,
}

/// Size limits, in each platform's own unit.
pub mod limits {
    /// DingTalk: a message's content, in bytes.
    pub const DINGTALK_BYTES: usize = 20_000;
    /// WeCom: a markdown message's content, in UTF-8 bytes.
    pub const WECOM_MARKDOWN_BYTES: usize = 4096;
    /// Feishu: the whole request body, in bytes (20 KB).
    pub const FEISHU_BODY_BYTES: usize = 20 * 1024;
    /// Slack: a header block's text, in characters.
    pub const SLACK_HEADER_CHARS: usize = 150;
    /// Slack: a section block's text, in characters.
    pub const SLACK_SECTION_CHARS: usize = 3000;
    /// Slack: a message's top-level `text`, in characters (Slack cuts longer ones itself).
    pub const SLACK_TEXT_CHARS: usize = 40_000;
}

/// The note that ends a message cut to fit.
fn truncated_note(language: Language) -> &'static str {
    match language {
        Language::En => "\n… (truncated to fit the platform's size limit)",
        Language::ZhCn => "\n…（内容过长，已截断）",
    }
}

/// `text` cut at a character boundary so that it, with the note, fits in `max_bytes` UTF-8
/// bytes; unchanged when it fits.
pub fn fit_bytes(text: &str, max_bytes: usize, language: Language) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let note = truncated_note(language);
    let mut end = max_bytes.saturating_sub(note.len()).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{note}", &text[..end])
}

/// `text` cut to at most `max_chars` characters, the note included; unchanged when it fits.
pub fn fit_chars(text: &str, max_chars: usize, language: Language) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let note = truncated_note(language);
    let keep = max_chars.saturating_sub(note.chars().count());
    let mut out: String = text.chars().take(keep).collect();
    out.push_str(note);
    out
}

/// Slack's escaping of message text: `&`, `<` and `>`, so that alert text cannot ping
/// `<!channel>` or forge a link.
pub fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Markdown renderers join single newlines; keep each line its own.
fn markdown_lines(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{l}  ")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Robot {
    /// The keyword line that starts every message, if a keyword is set.
    fn keyword_prefix(&self) -> String {
        self.keyword
            .as_deref()
            .filter(|k| !k.is_empty())
            .map(|k| format!("{k}\n"))
            .unwrap_or_default()
    }

    /// The mentions as they must appear in a message's text, per platform.
    fn mention_text(&self, format: BodyFormat) -> String {
        let mut parts: Vec<String> = Vec::new();
        match format {
            BodyFormat::Dingtalk => {
                if self.mention_all {
                    parts.push("@all".into());
                }
                parts.extend(self.mention_mobiles.iter().map(|m| format!("@{m}")));
                parts.extend(self.mention_users.iter().map(|u| format!("@{u}")));
            }
            BodyFormat::Wecom => {
                // WeCom's markdown mentions users only (`mentioned_list` is for text messages).
                parts.extend(self.mention_users.iter().map(|u| format!("<@{u}>")));
            }
            BodyFormat::Feishu => {
                if self.mention_all {
                    parts.push("<at user_id=\"all\">所有人</at>".into());
                }
                parts.extend(
                    self.mention_users
                        .iter()
                        .map(|u| format!("<at user_id=\"{}\"></at>", feishu_attr(u))),
                );
            }
            BodyFormat::Slack => {
                if self.mention_all {
                    parts.push("<!here>".into());
                }
                parts.extend(
                    self.mention_users
                        .iter()
                        .map(|u| format!("<@{}>", slack_escape(u))),
                );
            }
            BodyFormat::Herald | BodyFormat::Alertmanager => {}
        }
        parts.join(" ")
    }
}

/// A user id as a Feishu `<at>` attribute value (no quotes or angle brackets).
fn feishu_attr(id: &str) -> String {
    id.chars()
        .filter(|c| !matches!(c, '"' | '<' | '>'))
        .collect()
}

/// The request body of a chat format, per the platform's documented schema, within its size
/// limit (cut with a visible note), with the robot's keyword and mentions, and for Feishu its
/// signature (`now` is the signing time, in seconds). `None` for non-chat formats.
pub fn body(
    format: BodyFormat,
    title: &str,
    message: &str,
    language: Language,
    robot: &Robot,
    now: i64,
) -> Option<Value> {
    let keyword = robot.keyword_prefix();
    let mentions = robot.mention_text(format);
    let tail = if mentions.is_empty() {
        String::new()
    } else {
        format!("\n\n{mentions}")
    };
    let value = match format {
        BodyFormat::Herald | BodyFormat::Alertmanager => return None,
        BodyFormat::Dingtalk => {
            let text = format!("{keyword}### {title}\n\n{}", markdown_lines(message));
            let room = limits::DINGTALK_BYTES.saturating_sub(tail.len());
            let text = fit_bytes(&text, room, language) + &tail;
            let mut at = json!({"isAtAll": robot.mention_all});
            if !robot.mention_mobiles.is_empty() {
                at["atMobiles"] = json!(robot.mention_mobiles);
            }
            if !robot.mention_users.is_empty() {
                at["atUserIds"] = json!(robot.mention_users);
            }
            json!({
                "msgtype": "markdown",
                "markdown": {"title": format!("{keyword}{title}").trim_end(), "text": text},
                "at": at,
            })
        }
        BodyFormat::Wecom => {
            let content = format!("{keyword}**{title}**\n{message}");
            let room = limits::WECOM_MARKDOWN_BYTES.saturating_sub(tail.len());
            json!({
                "msgtype": "markdown",
                "markdown": {"content": fit_bytes(&content, room, language) + &tail},
            })
        }
        BodyFormat::Feishu => {
            let text = format!("{keyword}{title}\n{message}");
            // The limit is on the whole body: leave room for the JSON around the text, its
            // escapes and the signature.
            let escapes = text
                .bytes()
                .filter(|b| matches!(b, b'"' | b'\\' | b'\n' | b'\t' | b'\r') || *b < 0x20)
                .count();
            let room = limits::FEISHU_BODY_BYTES.saturating_sub(512 + tail.len() + escapes * 5);
            let mut value = json!({
                "msg_type": "text",
                "content": {"text": fit_bytes(&text, room, language) + &tail},
            });
            if let Some(secret) = &robot.secret {
                value["timestamp"] = json!(now.to_string());
                value["sign"] = json!(feishu_sign(secret.expose(), now));
            }
            value
        }
        BodyFormat::Slack => {
            let title = slack_escape(title);
            let message = slack_escape(message);
            let keyword = slack_escape(&keyword);
            let text = format!("{keyword}{title}\n{message}");
            let section = format!("{keyword}{message}");
            let room = limits::SLACK_SECTION_CHARS.saturating_sub(tail.chars().count());
            json!({
                "text": fit_chars(&text, limits::SLACK_TEXT_CHARS.saturating_sub(tail.chars().count()), language) + &tail,
                "blocks": [
                    {"type": "header", "text": {"type": "plain_text",
                        "text": fit_chars(&title, limits::SLACK_HEADER_CHARS, language)}},
                    {"type": "section", "text": {"type": "mrkdwn",
                        "text": fit_chars(&section, room, language) + &tail}},
                ],
            })
        }
    };
    Some(value)
}

/// HMAC-SHA256 as the robots use it, base64-encoded.
fn hmac_base64(key: &[u8], message: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(message);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// DingTalk's signature: base64 of HMAC-SHA256 over "timestamp\nsecret" keyed by the secret
/// (`timestamp` in milliseconds), sent URL-encoded as `sign` in the query.
pub fn dingtalk_sign(secret: &str, timestamp_ms: i64) -> String {
    hmac_base64(
        secret.as_bytes(),
        format!("{timestamp_ms}\n{secret}").as_bytes(),
    )
}

/// The URL a signed DingTalk request goes to: the robot's URL with `timestamp` and `sign`.
pub fn dingtalk_signed_uri(
    uri: &http::Uri,
    secret: &str,
    timestamp_ms: i64,
) -> Result<http::Uri, http::Error> {
    let sign = dingtalk_sign(secret, timestamp_ms);
    let encoded: String = url::form_urlencoded::byte_serialize(sign.as_bytes()).collect();
    let path = uri.path();
    let path_and_query = match uri.query() {
        Some(query) if !query.is_empty() => {
            format!("{path}?{query}&timestamp={timestamp_ms}&sign={encoded}")
        }
        _ => format!("{path}?timestamp={timestamp_ms}&sign={encoded}"),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse()?);
    Ok(http::Uri::from_parts(parts)?)
}

/// Feishu's signature: base64 of HMAC-SHA256 keyed by "timestamp\nsecret" over nothing
/// (`timestamp` in seconds), sent as `sign` in the body.
pub fn feishu_sign(secret: &str, timestamp: i64) -> String {
    hmac_base64(format!("{timestamp}\n{secret}").as_bytes(), b"")
}

/// What a robot's answer means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The message was taken.
    Taken,
    /// Sent too fast: try again after the platform's block time.
    RateLimited {
        /// How long the platform blocks.
        wait: Duration,
        /// The platform's words.
        reason: String,
    },
    /// The platform is busy: try again with the usual backoff.
    Busy(String),
    /// Refused for good (bad signature or keyword, bad token, message too large, ...).
    Refused(String),
}

/// Reads a chat robot's answer (`status` and the start of its body) for a format. `None` for
/// non-chat formats, and for answers the HTTP status alone explains (non-2xx other than
/// Slack's, whose body names the error).
pub fn read_answer(format: BodyFormat, status: u16, body: &[u8]) -> Option<Answer> {
    let success = (200..300).contains(&status);
    match format {
        BodyFormat::Herald | BodyFormat::Alertmanager => None,
        BodyFormat::Slack => read_slack(status, body),
        _ if !success => None,
        BodyFormat::Dingtalk => {
            let (code, text) = code_and_text(body, &["errcode"], &["errmsg"])?;
            Some(match code {
                0 => Answer::Taken,
                // "send too fast, exceed 20 times per minute": the robot is blocked for 10
                // minutes.
                130101 => Answer::RateLimited {
                    wait: Duration::from_secs(600),
                    reason: format!("DingTalk rate limit: errcode 130101: {text}"),
                },
                -1 => Answer::Busy(format!("DingTalk busy: errcode -1: {text}")),
                code => Answer::Refused(format!(
                    "DingTalk refused the message: errcode {code}: {text}{}",
                    dingtalk_hint(code)
                )),
            })
        }
        BodyFormat::Wecom => {
            let (code, text) = code_and_text(body, &["errcode"], &["errmsg"])?;
            Some(match code {
                0 => Answer::Taken,
                // "api freq out of limit": 20 messages a minute.
                45009 => Answer::RateLimited {
                    wait: Duration::from_secs(60),
                    reason: format!("WeCom rate limit: errcode 45009: {text}"),
                },
                -1 => Answer::Busy(format!("WeCom busy: errcode -1: {text}")),
                code => {
                    Answer::Refused(format!("WeCom refused the message: errcode {code}: {text}"))
                }
            })
        }
        BodyFormat::Feishu => {
            let (code, text) =
                code_and_text(body, &["code", "StatusCode"], &["msg", "StatusMessage"])?;
            Some(match code {
                0 => Answer::Taken,
                // 100 a minute and 5 a second: wait out the minute.
                9499 | 11232 => Answer::RateLimited {
                    wait: Duration::from_secs(60),
                    reason: format!("Feishu rate limit: code {code}: {text}"),
                },
                code => Answer::Refused(format!(
                    "Feishu refused the message: code {code}: {text}{}",
                    feishu_hint(code)
                )),
            })
        }
    }
}

/// What to check for DingTalk's usual refusals.
fn dingtalk_hint(code: i64) -> &'static str {
    match code {
        310000 => " (check the robot's keyword, signing secret and IP allow-list)",
        300001 => " (check the access_token in the URL)",
        460101 => " (message too large)",
        _ => "",
    }
}

/// What to check for Feishu's usual refusals.
fn feishu_hint(code: i64) -> &'static str {
    match code {
        19021 => " (signature mismatch: check the signing secret and the clock)",
        19024 => " (the robot's keyword is missing from the message)",
        19022 => " (this address is not on the robot's IP allow-list)",
        _ => "",
    }
}

/// The first of `codes` present as an integer in a JSON body, with the first of `texts`.
/// `None` when the body is not JSON or names no code (a relay that answers otherwise is taken
/// at its HTTP status).
fn code_and_text(body: &[u8], codes: &[&str], texts: &[&str]) -> Option<(i64, String)> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let code = codes.iter().find_map(|k| value.get(*k)?.as_i64())?;
    let text = texts
        .iter()
        .find_map(|k| value.get(*k)?.as_str())
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    Some((code, text))
}

/// Slack answers `ok` as plain text, or an error name (`invalid_payload`, `no_text`,
/// `channel_not_found`, `rate_limited`, ...) with a 4xx or 5xx.
fn read_slack(status: u16, body: &[u8]) -> Option<Answer> {
    let text: String = String::from_utf8_lossy(body)
        .trim()
        .chars()
        .take(200)
        .collect();
    match status {
        200..=299 => Some(Answer::Taken),
        429 => Some(Answer::RateLimited {
            wait: Duration::from_secs(1),
            reason: format!("Slack rate limit: HTTP 429: {text}"),
        }),
        500..=599 => Some(Answer::Busy(format!("Slack error: HTTP {status}: {text}"))),
        _ => Some(Answer::Refused(format!(
            "Slack refused the message: HTTP {status}: {text}"
        ))),
    }
}

/// A platform's default pace: at most this many messages per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DefaultPace {
    /// Messages per second, if the platform limits seconds.
    pub per_second: Option<u32>,
    /// Messages per minute, if the platform limits minutes.
    pub per_minute: Option<u32>,
}

/// Each platform's documented limit, Herald's default pace for a robot's URL.
pub fn default_pace(format: BodyFormat) -> Option<DefaultPace> {
    match format {
        BodyFormat::Dingtalk | BodyFormat::Wecom => Some(DefaultPace {
            per_second: None,
            per_minute: Some(20),
        }),
        BodyFormat::Feishu => Some(DefaultPace {
            per_second: Some(5),
            per_minute: Some(100),
        }),
        BodyFormat::Slack => Some(DefaultPace {
            per_second: Some(1),
            per_minute: None,
        }),
        BodyFormat::Herald | BodyFormat::Alertmanager => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dingtalk_signature_matches_a_known_value() {
        // Computed independently: printf '1700000000000\nSECabc' | openssl dgst -sha256
        // -hmac SECabc -binary | base64.
        assert_eq!(
            dingtalk_sign("SECabc", 1_700_000_000_000),
            "jcUpW0QmtKduN03n4JqQ0PBosVjqnM8gU7fIIvsDmCM="
        );
        // printf '' | openssl dgst -sha256 -hmac "$(printf '1700000000\nfeishu-secret')"
        // -binary | base64.
        assert_eq!(
            feishu_sign("feishu-secret", 1_700_000_000),
            "OrBzY1Y01Gq+HgJsl+7OfWcMVwc7YocohQm5iiZwjhU="
        );
        let uri: http::Uri = "https://oapi.dingtalk.com/robot/send?access_token=t"
            .parse()
            .expect("uri");
        let signed = dingtalk_signed_uri(&uri, "SECabc", 1_700_000_000_000).expect("uri");
        let query = signed.query().expect("query");
        assert!(
            query.starts_with("access_token=t&timestamp=1700000000000&sign="),
            "{query}"
        );
    }

    #[test]
    fn cuts_fall_on_character_boundaries_with_a_note() {
        let chinese = "告警".repeat(3000);
        let cut = fit_bytes(&chinese, limits::WECOM_MARKDOWN_BYTES, Language::ZhCn);
        assert!(cut.len() <= limits::WECOM_MARKDOWN_BYTES);
        assert!(cut.ends_with("已截断）"));
        assert_eq!(fit_bytes("short", 10, Language::En), "short");
        let cut = fit_chars(&"x".repeat(200), 150, Language::En);
        assert_eq!(cut.chars().count(), 150);
        assert!(cut.contains("truncated"));
    }

    #[test]
    fn slack_text_is_escaped() {
        assert_eq!(
            slack_escape("<!channel> & <@U1>"),
            "&lt;!channel&gt; &amp; &lt;@U1&gt;"
        );
    }
}
