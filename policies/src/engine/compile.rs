//! Turns a [`Bundle`] into a validated Cedar policy set plus what the
//! engine needs to know about each policy (its annotations), with every
//! problem located at file:line:column.

use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{Effect as CedarEffect, PolicyId, PolicySet, Schema, ValidationMode, Validator};
use miette::Diagnostic;

use crate::bundle::{Bundle, BundleError, Problem, SCHEMA_FILE, Severity};

/// Annotations Gatehouse reads. Others are allowed (for documentation) but
/// draw a warning, so that a typo such as `@reasons` does not go unnoticed.
const KNOWN_ANNOTATIONS: [&str; 4] = ["id", "reason", "approval", "read_only"];

/// What the engine knows about one policy.
#[derive(Debug, Clone)]
pub(crate) struct PolicyMeta {
    /// Position in the bundle (file order, then order in the file): the
    /// order in which determining policies are reported.
    pub ordinal: usize,
    pub id: String,
    pub forbid: bool,
    pub reason: Option<String>,
    /// `@approval("required")` on a forbid.
    pub approval: bool,
    /// `@read_only` on a permit.
    pub read_only: bool,
}

pub(crate) struct Compiled {
    pub policies: PolicySet,
    pub schema: Schema,
    pub meta: HashMap<PolicyId, PolicyMeta>,
    pub warnings: Vec<Problem>,
}

/// Where a policy came from, to locate validation errors.
struct Origin<'a> {
    file: &'a str,
    text: &'a str,
    offset: usize,
}

pub(crate) fn compile(bundle: &Bundle) -> Result<Compiled, BundleError> {
    let computed = bundle.content_hash();
    if computed != bundle.hash {
        return Err(BundleError::HashMismatch {
            declared: bundle.hash.clone(),
            computed,
        });
    }

    let mut problems = Vec::new();
    let schema = match Schema::from_cedarschema_str(&bundle.schema) {
        Ok((schema, warnings)) => {
            for w in warnings {
                problems.push(located(Severity::Warning, SCHEMA_FILE, &bundle.schema, &w));
            }
            Some(schema)
        }
        Err(e) => {
            problems.push(located(Severity::Error, SCHEMA_FILE, &bundle.schema, &e));
            None
        }
    };

    let mut policies = PolicySet::new();
    let mut meta: HashMap<PolicyId, PolicyMeta> = HashMap::new();
    let mut origins: HashMap<PolicyId, Origin<'_>> = HashMap::new();
    let mut seen_files: Vec<&str> = Vec::new();
    for (file, text) in &bundle.files {
        if seen_files.contains(&file.as_str()) {
            problems.push(Problem::at(
                Severity::Error,
                file,
                text,
                0,
                "file appears twice in the bundle".into(),
            ));
            continue;
        }
        seen_files.push(file);
        let parsed = match PolicySet::from_str(text) {
            Ok(parsed) => parsed,
            Err(errors) => {
                for e in errors.iter() {
                    problems.push(located(Severity::Error, file, text, e));
                }
                continue;
            }
        };
        if let Some(t) = parsed.templates().next() {
            let offset = text.find(&t.to_cedar()).unwrap_or(0);
            problems.push(Problem::at(
                Severity::Error,
                file,
                text,
                offset,
                "policy templates (?principal / ?resource slots) are not supported in bundles"
                    .into(),
            ));
        }
        // `PolicySet::from_str` names policies `policy0`, `policy1`… in file order.
        let mut in_file: Vec<(usize, &cedar_policy::Policy)> = parsed
            .policies()
            .map(|p| {
                let index = p
                    .id()
                    .to_string()
                    .strip_prefix("policy")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX);
                (index, p)
            })
            .collect();
        in_file.sort_by_key(|(index, _)| *index);
        for (index, policy) in in_file {
            let offset = policy.to_cedar().and_then(|s| text.find(&s)).unwrap_or(0);
            let at = |message: String| {
                let mut p = Problem::at(Severity::Error, file, text, offset, message);
                p.policy = Some(policy.annotation("id").unwrap_or("").to_string());
                p
            };
            let id = match policy.annotation("id") {
                Some(id) if id.trim().is_empty() => {
                    problems.push(at("@id must not be empty".into()));
                    continue;
                }
                Some(id) => id.to_string(),
                None => format!("{file}:{index}"),
            };
            let forbid = policy.effect() == CedarEffect::Forbid;
            let mut m = PolicyMeta {
                ordinal: 0,
                id: id.clone(),
                forbid,
                reason: policy.annotation("reason").map(str::to_string),
                approval: false,
                read_only: false,
            };
            let mut ok = true;
            let mut fail = |message: String| {
                let mut p = at(message);
                p.policy = Some(id.clone());
                problems.push(p);
                ok = false;
            };
            if let Some(value) = policy.annotation("approval") {
                if value != "required" {
                    fail(format!(
                        "@approval(\"{value}\"): the only value is \"required\""
                    ));
                } else if !forbid {
                    fail("@approval belongs on a forbid (\"forbidden unless approved\"), not on a permit".into());
                }
                m.approval = true;
            }
            if let Some(value) = policy.annotation("read_only") {
                if !(value.is_empty() || value == "true") {
                    fail(format!(
                        "@read_only(\"{value}\"): write @read_only (or @read_only(\"true\")), or remove it"
                    ));
                } else if forbid {
                    fail("@read_only belongs on a permit (for connect), not on a forbid".into());
                }
                m.read_only = true;
            }
            if let Some(reason) = &m.reason
                && reason.trim().is_empty()
            {
                fail("@reason must not be empty".into());
            }
            if let Some(other) = origins.get(&PolicyId::new(&id)) {
                let (line, column) = crate::bundle::line_column(other.text, other.offset);
                fail(format!(
                    "policy id `{id}` is already used at {}:{line}:{column}",
                    other.file
                ));
            }
            if !ok {
                continue;
            }
            for (key, _) in policy.annotations() {
                if !KNOWN_ANNOTATIONS.contains(&key) {
                    let mut p = at(format!(
                        "unknown annotation @{key} (Gatehouse reads @id, @reason, @approval, @read_only)"
                    ));
                    p.severity = Severity::Warning;
                    p.policy = Some(id.clone());
                    problems.push(p);
                }
            }
            let pid = PolicyId::new(&id);
            m.ordinal = meta.len();
            if let Err(e) = policies.add(policy.new_id(pid.clone())) {
                problems.push(at(e.to_string()));
                continue;
            }
            meta.insert(pid.clone(), m);
            origins.insert(pid, Origin { file, text, offset });
        }
    }

    if let Some(schema) = &schema
        && !problems.iter().any(|p| p.severity == Severity::Error)
    {
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        for e in result.validation_errors() {
            problems.push(in_policy(Severity::Error, &origins, e.policy_id(), e));
        }
        for w in result.validation_warnings() {
            problems.push(in_policy(Severity::Warning, &origins, w.policy_id(), w));
        }
    }

    let (errors, warnings): (Vec<_>, Vec<_>) = problems
        .into_iter()
        .partition(|p| p.severity == Severity::Error);
    match schema {
        Some(schema) if errors.is_empty() => Ok(Compiled {
            policies,
            schema,
            meta,
            warnings,
        }),
        _ => Err(BundleError::Invalid(
            errors.into_iter().chain(warnings).collect(),
        )),
    }
}

/// A problem from a Cedar diagnostic whose labels point into `text`.
fn located(severity: Severity, file: &str, text: &str, d: &dyn Diagnostic) -> Problem {
    let offset = first_label(d).unwrap_or(0);
    let mut p = Problem::at(severity, file, text, offset, d.to_string());
    p.help = d.help().map(|h| h.to_string());
    p
}

/// A validation problem in policy `id`, located in the file it came from.
fn in_policy(
    severity: Severity,
    origins: &HashMap<PolicyId, Origin<'_>>,
    id: &PolicyId,
    d: &dyn Diagnostic,
) -> Problem {
    let Some(origin) = origins.get(id) else {
        return Problem {
            severity,
            file: String::new(),
            line: 0,
            column: 0,
            message: d.to_string(),
            help: d.help().map(|h| h.to_string()),
            policy: Some(id.to_string()),
        };
    };
    // Labels carry offsets into the file the policy was parsed from.
    let offset = first_label(d).unwrap_or(origin.offset);
    let mut p = Problem::at(severity, origin.file, origin.text, offset, d.to_string());
    p.help = d.help().map(|h| h.to_string());
    p.policy = Some(id.to_string());
    p
}

fn first_label(d: &dyn Diagnostic) -> Option<usize> {
    d.labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset())
}
