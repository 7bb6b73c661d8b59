//! The contract's routing rules, case by case, from YAML fixtures.

use super::*;
use crate::crd::{NotificationCondition, Webhook};

const CLUSTER_NS: &str = "monitoring";

/// Builds a table from a multi-document YAML of Webhooks and NotificationConditions.
fn table(yaml: &str) -> Table {
    let mut table = Table::new([CLUSTER_NS.to_string()]);
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).expect("fixture YAML");
    for doc in docs {
        let namespace = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or(CLUSTER_NS)
            .to_string();
        match doc["kind"].as_str() {
            Some("Webhook") => {
                let wh: Webhook = serde_json::from_value(doc).expect("webhook fixture");
                table.apply_webhook(WebhookInput {
                    key: ObjectKey::new(namespace, wh.metadata.name.clone().expect("name")),
                    labels: wh.metadata.labels.clone().unwrap_or_default().into(),
                    spec: wh.spec.into(),
                    credentials: Ok(()),
                });
            }
            Some("NotificationCondition") => {
                let nc: NotificationCondition =
                    serde_json::from_value(doc).expect("condition fixture");
                table.apply_condition(ConditionInput {
                    key: ObjectKey::new(namespace, nc.metadata.name.clone().expect("name")),
                    spec: nc.spec,
                });
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    table
}

fn alert(labels: &[(&str, &str)]) -> Alert {
    Alert {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Alert::default()
    }
}

fn names(keys: Vec<ObjectKey>) -> Vec<String> {
    keys.into_iter().map(|k| k.to_string()).collect()
}

fn verdict(table: &Table, alert: &Alert, key: &str) -> Result<(), Rejection> {
    table
        .explain(Subject::alert(alert))
        .into_iter()
        .find(|v| v.webhook.to_string() == key)
        .expect("webhook in explain")
        .outcome
}

const TWO_WEBHOOKS: &str = r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: ops, namespace: monitoring}
spec: {url: "https://ops.example/hook"}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: paused, namespace: monitoring}
spec: {url: "https://paused.example/hook", enabled: false}
"#;

#[test]
fn enabled_webhook_gets_every_alert_and_disabled_gets_none() {
    let t = table(TWO_WEBHOOKS);
    let a = alert(&[("alertname", "HighCPU")]);
    assert_eq!(names(t.resolve(Subject::alert(&a))), ["monitoring/ops"]);
    assert_eq!(
        verdict(&t, &a, "monitoring/paused"),
        Err(Rejection::Disabled)
    );
    let ready = t
        .readiness(&ObjectKey::new("monitoring", "paused"))
        .expect("known");
    assert_eq!(
        ready.expect_err("disabled").reason,
        NotReadyReason::Disabled
    );
}

#[test]
fn delete_removes_a_webhook() {
    let mut t = table(TWO_WEBHOOKS);
    t.delete_webhook(&ObjectKey::new("monitoring", "ops"));
    assert!(t.resolve(Subject::alert(&alert(&[]))).is_empty());
    assert_eq!(t.len(), 1);
    t.delete_webhook(&ObjectKey::new("monitoring", "nope"));
    assert_eq!(t.len(), 1);
}

#[test]
fn reapplying_a_webhook_replaces_it_including_its_type() {
    let mut t = table(TWO_WEBHOOKS);
    let wh: Webhook = serde_saphyr::from_str(
        "apiVersion: herald.dev/v1alpha1\nkind: Webhook\nmetadata: {name: ops}\nspec: {url: 'http://x', type: Events}\n",
    )
    .expect("yaml");
    t.apply_webhook(WebhookInput {
        key: ObjectKey::new("monitoring", "ops"),
        labels: Default::default(),
        spec: wh.spec.into(),
        credentials: Ok(()),
    });
    let a = alert(&[]);
    assert!(t.resolve(Subject::alert(&a)).is_empty());
    assert_eq!(names(t.resolve(Subject::event(&a))), ["monitoring/ops"]);
    assert_eq!(
        verdict(&t, &a, "monitoring/ops"),
        Err(Rejection::WrongType(WebhookType::Events))
    );
}

const CONDITIONS: &str = r#"
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: critical-only, namespace: monitoring}
spec:
  matchExpressions:
    - {key: severity, operator: In, values: [critical]}
---
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: not-test, namespace: monitoring}
spec:
  matchExpressions:
    - {key: env, operator: NotIn, values: [test, dev]}
---
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: has-node, namespace: monitoring}
spec:
  matchExpressions:
    - {key: node, operator: Exists}
---
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: no-silence, namespace: monitoring}
spec:
  matchExpressions:
    - {key: silenced, operator: DoesNotExist}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: in, namespace: monitoring}
spec: {url: "http://in", conditions: [critical-only]}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: notin, namespace: monitoring}
spec: {url: "http://notin", conditions: [not-test]}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: exists, namespace: monitoring}
spec: {url: "http://exists", conditions: [has-node]}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: absent, namespace: monitoring}
spec: {url: "http://absent", conditions: [no-silence]}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: all, namespace: monitoring}
spec: {url: "http://all", conditions: [critical-only, has-node]}
"#;

#[test]
fn operator_in_needs_the_label_with_a_listed_value() {
    let t = table(CONDITIONS);
    let hit = alert(&[("severity", "critical")]);
    let miss = alert(&[("severity", "warning")]);
    let absent = alert(&[]);
    assert!(
        t.resolve(Subject::alert(&hit))
            .contains(&ObjectKey::new("monitoring", "in"))
    );
    for a in [&miss, &absent] {
        assert_eq!(
            verdict(&t, a, "monitoring/in"),
            Err(Rejection::ConditionFailed {
                condition: "critical-only".into(),
                label: "severity".into(),
                operator: LabelOperator::In
            })
        );
    }
}

#[test]
fn operator_not_in_holds_when_the_label_is_absent() {
    let t = table(CONDITIONS);
    assert_eq!(verdict(&t, &alert(&[]), "monitoring/notin"), Ok(()));
    assert_eq!(
        verdict(&t, &alert(&[("env", "prod")]), "monitoring/notin"),
        Ok(())
    );
    assert!(verdict(&t, &alert(&[("env", "dev")]), "monitoring/notin").is_err());
}

#[test]
fn operators_exists_and_does_not_exist() {
    let t = table(CONDITIONS);
    assert_eq!(
        verdict(&t, &alert(&[("node", "")]), "monitoring/exists"),
        Ok(())
    );
    assert!(verdict(&t, &alert(&[]), "monitoring/exists").is_err());
    assert_eq!(verdict(&t, &alert(&[]), "monitoring/absent"), Ok(()));
    assert!(verdict(&t, &alert(&[("silenced", "yes")]), "monitoring/absent").is_err());
}

#[test]
fn every_listed_condition_must_hold() {
    let t = table(CONDITIONS);
    assert_eq!(
        verdict(
            &t,
            &alert(&[("severity", "critical"), ("node", "n1")]),
            "monitoring/all"
        ),
        Ok(())
    );
    let err =
        verdict(&t, &alert(&[("severity", "critical")]), "monitoring/all").expect_err("no node");
    assert_eq!(
        err.to_string(),
        "condition has-node failed on label node (Exists)"
    );
}

#[test]
fn missing_condition_fails_closed_and_makes_the_webhook_not_ready() {
    let mut t = table(CONDITIONS);
    t.delete_condition(&ObjectKey::new("monitoring", "critical-only"));
    let a = alert(&[("severity", "critical")]);
    assert!(
        !t.resolve(Subject::alert(&a))
            .contains(&ObjectKey::new("monitoring", "in"))
    );
    let Err(Rejection::NotReady(not_ready)) = verdict(&t, &a, "monitoring/in") else {
        panic!("expected NotReady");
    };
    assert_eq!(not_ready.reason, NotReadyReason::ConditionNotFound);
    assert!(not_ready.message.contains("critical-only"));
    // The condition coming back restores delivery.
    t.apply_condition(ConditionInput {
        key: ObjectKey::new("monitoring", "critical-only"),
        spec: serde_json::from_value(serde_json::json!({
            "matchExpressions": [{"key": "severity", "operator": "In", "values": ["critical"]}]
        }))
        .expect("spec"),
    });
    assert!(
        t.resolve(Subject::alert(&a))
            .contains(&ObjectKey::new("monitoring", "in"))
    );
}

#[test]
fn a_condition_with_the_same_name_in_another_namespace_does_not_count() {
    let t = table(
        r#"
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: critical-only, namespace: other}
spec:
  matchExpressions: [{key: severity, operator: Exists}]
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: ops, namespace: monitoring}
spec: {url: "http://ops", conditions: [critical-only]}
"#,
    );
    let ready = t
        .readiness(&ObjectKey::new("monitoring", "ops"))
        .expect("known");
    assert_eq!(
        ready.expect_err("missing").reason,
        NotReadyReason::ConditionNotFound
    );
}

#[test]
fn webhook_selector_applies_a_condition_to_matching_webhooks_in_its_namespace() {
    let t = table(
        r#"
apiVersion: herald.dev/v1alpha1
kind: NotificationCondition
metadata: {name: ops-critical, namespace: monitoring}
spec:
  matchExpressions: [{key: severity, operator: In, values: [critical]}]
  webhookSelector: {matchLabels: {team: ops}}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: ops, namespace: monitoring, labels: {team: ops}}
spec: {url: "http://ops"}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: dev, namespace: monitoring, labels: {team: dev}}
spec: {url: "http://dev"}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: tenant-ops, namespace: team-a, labels: {team: ops}}
spec: {url: "http://tenant"}
"#,
    );
    let warning = alert(&[("severity", "warning"), ("namespace", "team-a")]);
    assert_eq!(
        names(t.resolve(Subject::alert(&warning))),
        ["monitoring/dev", "team-a/tenant-ops"]
    );
    let critical = alert(&[("severity", "critical"), ("namespace", "team-a")]);
    assert_eq!(
        names(t.resolve(Subject::alert(&critical))),
        ["monitoring/dev", "monitoring/ops", "team-a/tenant-ops"]
    );
    assert_eq!(
        t.conditions_of(&ObjectKey::new("monitoring", "ops")),
        ["ops-critical"]
    );
    assert!(
        t.conditions_of(&ObjectKey::new("team-a", "tenant-ops"))
            .is_empty()
    );
}

#[test]
fn event_types_filter_by_alertname_for_alarms_and_reason_for_events() {
    let t = table(
        r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: cpu, namespace: monitoring}
spec: {url: "http://cpu", eventTypes: [HighCPU, HighLoad]}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: backoff, namespace: monitoring}
spec: {url: "http://backoff", type: Events, eventTypes: [BackOff]}
"#,
    );
    assert_eq!(
        names(t.resolve(Subject::alert(&alert(&[("alertname", "HighCPU")])))),
        ["monitoring/cpu"]
    );
    assert_eq!(
        verdict(&t, &alert(&[("alertname", "DiskFull")]), "monitoring/cpu"),
        Err(Rejection::EventTypeNotWanted("DiskFull".into()))
    );
    let event = alert(&[("reason", "BackOff"), ("namespace", "x")]);
    assert_eq!(
        names(t.resolve(Subject::event(&event))),
        ["monitoring/backoff"]
    );
    let other = alert(&[("reason", "Pulled")]);
    assert!(t.resolve(Subject::event(&other)).is_empty());
}

#[test]
fn send_resolved_false_drops_resolved_alerts_only() {
    let t = table(
        r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: firing-only, namespace: monitoring}
spec: {url: "http://f", sendResolved: false}
"#,
    );
    let mut a = alert(&[("alertname", "X")]);
    assert_eq!(t.resolve(Subject::alert(&a)).len(), 1);
    a.status = AlertStatus::Resolved;
    assert!(t.resolve(Subject::alert(&a)).is_empty());
    assert_eq!(
        verdict(&t, &a, "monitoring/firing-only"),
        Err(Rejection::ResolvedNotWanted)
    );
}

#[test]
fn tenant_webhooks_see_only_their_own_namespace() {
    let t = table(
        r#"
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: central, namespace: monitoring}
spec: {url: "http://central"}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: a, namespace: team-a}
spec: {url: "http://a"}
---
apiVersion: herald.dev/v1alpha1
kind: Webhook
metadata: {name: b, namespace: team-b}
spec: {url: "http://b"}
"#,
    );
    let in_a = alert(&[("namespace", "team-a")]);
    assert_eq!(
        names(t.resolve(Subject::alert(&in_a))),
        ["monitoring/central", "team-a/a"]
    );
    assert_eq!(
        verdict(&t, &in_a, "team-b/b"),
        Err(Rejection::Tenancy {
            alert_namespace: Some("team-a".into())
        })
    );
    let cluster_wide = alert(&[("alertname", "NodeDown")]);
    assert_eq!(
        names(t.resolve(Subject::alert(&cluster_wide))),
        ["monitoring/central"]
    );
    assert_eq!(
        verdict(&t, &cluster_wide, "team-a/a")
            .expect_err("no namespace")
            .to_string(),
        "tenancy: alert has no namespace label"
    );
}

#[test]
fn unresolved_credentials_block_delivery() {
    let mut t = table(TWO_WEBHOOKS);
    let mut input = t
        .webhook(&ObjectKey::new("monitoring", "ops"))
        .expect("ops")
        .clone();
    input.credentials = Err(NotReady::new(
        NotReadyReason::SecretNotFound,
        "Secret \"ops-auth\" not found",
    ));
    t.apply_webhook(input);
    assert!(t.resolve(Subject::alert(&alert(&[]))).is_empty());
    let ready = t
        .readiness(&ObjectKey::new("monitoring", "ops"))
        .expect("known");
    assert_eq!(
        ready.expect_err("secret").reason,
        NotReadyReason::SecretNotFound
    );
}

#[test]
fn resolve_agrees_with_explain() {
    let t = table(CONDITIONS);
    for labels in [
        vec![("severity", "critical"), ("node", "n")],
        vec![("env", "dev"), ("silenced", "1")],
        vec![],
    ] {
        let a = alert(&labels);
        let explained: Vec<ObjectKey> = t
            .explain(Subject::alert(&a))
            .into_iter()
            .filter(|v| v.outcome.is_ok())
            .map(|v| v.webhook)
            .collect();
        assert_eq!(t.resolve(Subject::alert(&a)), explained);
    }
}

/// The index narrows candidates by namespace, event type and one `In` requirement per
/// condition; whatever is applied, changed or deleted, it must pick exactly the webhooks a
/// full scan (`explain`) accepts.
#[test]
fn indexed_resolve_agrees_with_a_full_scan_through_random_changes() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const NAMESPACES: [&str; 3] = [CLUSTER_NS, "team-a", "team-b"];
    const LABELS: [&str; 4] = ["alertname", "severity", "team", "namespace"];
    const VALUES: [&str; 4] = ["HighCPU", "critical", "team-a", "team-b"];
    const OPERATORS: [LabelOperator; 4] = [
        LabelOperator::In,
        LabelOperator::NotIn,
        LabelOperator::Exists,
        LabelOperator::DoesNotExist,
    ];

    let mut rng = StdRng::seed_from_u64(0x4e7a1d);
    let pick = |rng: &mut StdRng, items: &[&'static str]| items[rng.random_range(0..items.len())];
    let mut t = Table::new([CLUSTER_NS.to_string()]);
    let alerts: Vec<Alert> = (0..64)
        .map(|_| {
            let mut labels = LabelSet::new();
            for label in LABELS {
                if rng.random_bool(0.7) {
                    labels.insert(label.to_string(), pick(&mut rng, &VALUES).to_string());
                }
            }
            if rng.random_bool(0.5) {
                labels.insert("namespace".into(), pick(&mut rng, &NAMESPACES).to_string());
            }
            Alert {
                labels,
                ..Alert::default()
            }
        })
        .collect();

    for step in 0..400 {
        let namespace = pick(&mut rng, &NAMESPACES);
        let name = format!("n{}", rng.random_range(0..6));
        let key = ObjectKey::new(namespace, name.clone());
        match rng.random_range(0..10) {
            0..=3 => {
                let match_expressions = (0..rng.random_range(1..4))
                    .map(|_| {
                        let operator = OPERATORS[rng.random_range(0..OPERATORS.len())];
                        let values = match operator {
                            LabelOperator::In | LabelOperator::NotIn => (0..rng.random_range(1..3))
                                .map(|_| pick(&mut rng, &VALUES).to_string())
                                .collect(),
                            _ => Vec::new(),
                        };
                        LabelRequirement {
                            key: pick(&mut rng, &LABELS).to_string(),
                            operator,
                            values,
                        }
                    })
                    .collect();
                let spec: NotificationConditionSpec =
                    serde_json::from_value(serde_json::json!({"matchExpressions": []}))
                        .expect("empty condition");
                t.apply_condition(ConditionInput {
                    key,
                    spec: NotificationConditionSpec {
                        match_expressions,
                        ..spec
                    },
                });
            }
            4 => t.delete_condition(&key),
            5..=8 => {
                let conditions: Vec<String> = (0..rng.random_range(0..3))
                    .map(|_| format!("n{}", rng.random_range(0..6)))
                    .collect();
                let event_types: Vec<&str> = if rng.random_bool(0.3) {
                    vec![pick(&mut rng, &["HighCPU", "critical"])]
                } else {
                    vec![]
                };
                let spec = serde_json::json!({
                    "url": "https://example.test/hook",
                    "conditions": conditions,
                    "eventTypes": event_types,
                    "sendResolved": rng.random_bool(0.5),
                });
                t.apply_webhook(WebhookInput {
                    key,
                    labels: Labels::default(),
                    spec: serde_json::from_value::<WebhookSpec>(spec)
                        .expect("webhook spec")
                        .into(),
                    credentials: Ok(()),
                });
            }
            _ => t.delete_webhook(&key),
        }
        for a in &alerts {
            let full_scan: Vec<ObjectKey> = t
                .explain(Subject::alert(a))
                .into_iter()
                .filter(|v| v.outcome.is_ok())
                .map(|v| v.webhook)
                .collect();
            assert_eq!(
                t.resolve(Subject::alert(a)),
                full_scan,
                "step {step}, alert {:?}",
                a.labels
            );
        }
    }
}
