//! The console's words in English and Simplified Chinese, and the choice between them.

use std::collections::BTreeMap;

/// A language of the console's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    /// English.
    En,
    /// Simplified Chinese.
    ZhCn,
}

impl Lang {
    /// The tag used in `lang` attributes and the language cookie.
    pub fn tag(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::ZhCn => "zh-CN",
        }
    }

    /// Parses a tag as written in the cookie or the `lang` query (`en`, `zh-CN`, `zh`).
    pub fn from_tag(tag: &str) -> Option<Lang> {
        let tag = tag.trim().to_ascii_lowercase();
        if tag == "en" || tag.starts_with("en-") {
            Some(Lang::En)
        } else if tag == "zh" || tag.starts_with("zh-cn") || tag.starts_with("zh-hans") {
            Some(Lang::ZhCn)
        } else {
            None
        }
    }

    /// The preferred language of an `Accept-Language` header (by q-value), English by default.
    pub fn from_accept_language(header: &str) -> Lang {
        let mut best: Option<(f32, Lang)> = None;
        for part in header.split(',') {
            let mut pieces = part.split(';');
            let tag = pieces.next().unwrap_or("").trim();
            let q = pieces
                .find_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                })
                .unwrap_or(1.0);
            if let Some(lang) = Lang::from_tag(tag)
                && best.is_none_or(|(b, _)| q > b)
            {
                best = Some((q, lang));
            }
        }
        best.map_or(Lang::En, |(_, lang)| lang)
    }

    /// Every word of the pages in this language, by key.
    pub fn words(self) -> BTreeMap<&'static str, &'static str> {
        WORDS
            .iter()
            .map(|(key, en, zh)| (*key, if self == Lang::En { *en } else { *zh }))
            .collect()
    }
}

/// Key, English, Simplified Chinese.
const WORDS: &[(&str, &str, &str)] = &[
    ("title", "Herald console", "Herald 控制台"),
    ("webhooks", "Webhooks", "Webhook"),
    ("conditions", "Notification conditions", "通知条件"),
    ("routing", "Routing preview", "路由预览"),
    ("sign_in", "Sign in", "登录"),
    ("sign_out", "Sign out", "退出"),
    ("token", "Bearer token", "Bearer 令牌"),
    (
        "sign_in_cluster",
        "Sign in with a Kubernetes bearer token (for example from `kubectl create token`). Every read and write is made with this identity.",
        "使用 Kubernetes Bearer 令牌登录（例如 `kubectl create token` 生成的令牌）。所有读写都以该身份进行。",
    ),
    (
        "sign_in_folder",
        "Sign in with the console token (the content of --console-token-file).",
        "使用控制台令牌登录（--console-token-file 文件的内容）。",
    ),
    ("sign_in_failed", "The token was refused.", "令牌被拒绝。"),
    ("add", "Add", "添加"),
    ("name", "Name", "名称"),
    ("namespace", "Namespace", "命名空间"),
    ("type", "Type", "类型"),
    ("alarms", "Alarms", "告警"),
    ("events", "Events", "事件"),
    ("url", "URL", "URL"),
    ("language", "Message language", "消息语言"),
    ("auth_type", "Auth type", "认证类型"),
    ("auth_none", "None", "无"),
    ("auth_bearer", "Bearer token", "Bearer 令牌"),
    ("auth_basic", "Basic auth", "Basic 认证"),
    ("username", "Username", "用户名"),
    ("password", "Password", "密码"),
    (
        "credential_kept",
        "Leave empty to keep the stored value.",
        "留空则保留已保存的值。",
    ),
    ("skip_tls", "Skip TLS verification", "跳过 TLS 验证"),
    ("enabled", "Enabled", "已启用"),
    ("enable", "Enable", "启用"),
    ("disable", "Disable", "停用"),
    ("ready", "Ready", "就绪"),
    ("last_delivery", "Last delivery", "最近投递"),
    ("last_test", "Last test", "最近测试"),
    ("actions", "Actions", "操作"),
    ("modify", "Modify", "修改"),
    ("send_test", "Send test", "发送测试"),
    ("delete", "Delete", "删除"),
    (
        "delete_confirm",
        "Delete this webhook? This cannot be undone: its Secret and conditions created here go with it.",
        "确定删除此 Webhook？此操作无法撤销：此处创建的 Secret 和通知条件将一并删除。",
    ),
    ("cancel", "Cancel", "取消"),
    ("submit", "Submit", "提交"),
    ("filter", "Filter", "筛选"),
    ("all", "All", "全部"),
    ("yes", "Yes", "是"),
    ("no", "No", "否"),
    ("event_types", "Event types", "事件类型"),
    (
        "event_types_help",
        "Alertnames (Alarms) or Event reasons (Events), one per line; empty means every type.",
        "告警名称（告警）或事件原因（事件），每行一个；留空表示全部类型。",
    ),
    ("recently_seen", "Recently seen", "最近出现"),
    (
        "notification_conditions",
        "Notification conditions",
        "通知条件",
    ),
    ("label", "Label", "标签"),
    ("operator", "Operator", "运算符"),
    ("values", "Values", "值"),
    ("op_in", "Includes values", "包含值"),
    ("op_notin", "Does not include values", "不包含值"),
    ("op_exists", "Exists", "存在"),
    ("op_doesnotexist", "Does not exist", "不存在"),
    ("add_row", "Add condition", "添加条件"),
    ("delete_row", "Delete", "删除"),
    ("add_webhook", "Add webhook", "添加 Webhook"),
    ("modify_webhook", "Modify webhook", "修改 Webhook"),
    ("test_result", "Test result", "测试结果"),
    ("status_code", "Status code", "状态码"),
    ("latency", "Latency", "延迟"),
    ("error", "Error", "错误"),
    ("outcome", "Outcome", "结果"),
    ("time", "Time", "时间"),
    ("alerts", "Alerts", "告警数"),
    ("attempts", "Attempts", "尝试次数"),
    ("status", "Status", "状态"),
    ("replay", "Replay", "重放"),
    ("spec", "Spec", "配置"),
    ("status_conditions", "Status conditions", "状态条件"),
    ("recent_deliveries", "Recent deliveries", "最近投递"),
    ("dead_letters", "Dead letters", "死信"),
    (
        "k8s_events",
        "Events about this webhook",
        "与此 Webhook 相关的事件",
    ),
    ("reason", "Reason", "原因"),
    ("message", "Message", "消息"),
    ("none", "None", "无"),
    ("used_by", "Used by", "使用者"),
    ("requirements", "Requirements", "要求"),
    ("selector", "Webhook selector", "Webhook 选择器"),
    (
        "routing_help",
        "Paste an Alertmanager webhook payload or an array of alerts, or pick a recent one.",
        "粘贴 Alertmanager webhook 负载或告警数组，或选择最近的告警。",
    ),
    ("preview", "Preview", "预览"),
    ("reaches", "Reaches", "送达"),
    ("not_reached", "Not reached", "未送达"),
    ("refused", "Refused", "被拒绝"),
    (
        "test_requested",
        "Test requested: the result appears under Last test.",
        "已请求测试：结果将显示在“最近测试”中。",
    ),
    ("saved", "Saved.", "已保存。"),
    ("deleted", "Deleted.", "已删除。"),
    ("replayed", "Replay queued.", "已加入重放队列。"),
    (
        "not_allowed",
        "Your account may not do this.",
        "您的账户无权执行此操作。",
    ),
    (
        "read_only",
        "Read only: your account may not change webhooks here.",
        "只读：您的账户无权在此修改 Webhook。",
    ),
    ("no_webhooks", "No webhooks.", "没有 Webhook。"),
    (
        "pick_namespace",
        "Your account may not list webhooks in every namespace: enter a namespace in the filter.",
        "您的账户无权列出所有命名空间的 Webhook：请在筛选中输入命名空间。",
    ),
    ("not_found", "Not found.", "未找到。"),
    ("recent_alert", "Recent alert", "最近的告警"),
    ("lang_switch", "中文", "English"),
    ("unknown", "Unknown", "未知"),
    ("details", "Details", "详情"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_language_picks_the_highest_quality_known_language() {
        assert_eq!(
            Lang::from_accept_language("zh-CN,zh;q=0.9,en;q=0.8"),
            Lang::ZhCn
        );
        assert_eq!(
            Lang::from_accept_language("fr, en;q=0.5, zh;q=0.4"),
            Lang::En
        );
        assert_eq!(Lang::from_accept_language("fr"), Lang::En);
        assert_eq!(Lang::from_accept_language(""), Lang::En);
    }

    #[test]
    fn both_languages_have_every_word() {
        for (key, en, zh) in WORDS {
            assert!(!en.is_empty() && !zh.is_empty(), "{key}");
        }
        assert_eq!(Lang::En.words().len(), Lang::ZhCn.words().len());
    }
}
