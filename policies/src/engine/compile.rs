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
const KNOWN_ANNOTATIONS: [&str; 6] = [
    "id",
    "reason",
    "approval",
    "approvers",
    "approval_timeout",
    "read_only",
];

/// `@approvers("N")`: N distinct approvers, 1..=MAX_APPROVERS.
pub(crate) const MAX_APPROVERS: u32 = 10;
/// Approvers a command needs when no determining forbid says.
pub(crate) const DEFAULT_APPROVERS: u32 = 1;
/// `@approval_timeout("D")`: at most a day.
pub(crate) const MAX_APPROVAL_TIMEOUT_SECS: u32 = 24 * 3600;
/// How long an approval may wait when no determining forbid says.
pub(crate) const DEFAULT_APPROVAL_TIMEOUT_SECS: u32 = 300;

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
    /// `@approvers("N")` on an approval forbid: how many distinct approvers
    /// must grant. `None`: it does not say.
    pub approvers: Option<u32>,
    /// `@approval_timeout("D")` on an approval forbid, in seconds: how long
    /// the approval may wait. `None`: it does not say.
    pub approval_timeout_secs: Option<u32>,
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
                approvers: None,
                approval_timeout_secs: None,
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
            let approval_forbid = forbid && policy.annotation("approval").is_some();
            for key in ["approvers", "approval_timeout"] {
                if policy.annotation(key).is_none() || approval_forbid {
                    continue;
                }
                fail(if forbid {
                    format!(
                        "@{key} applies only to a forbid that also carries @approval(\"required\")"
                    )
                } else {
                    format!(
                        "@{key} belongs on a forbid with @approval(\"required\"), not on a permit"
                    )
                });
            }
            if let Some(value) = policy.annotation("approvers") {
                match parse_approvers(value) {
                    Some(n) => m.approvers = Some(n),
                    None => fail(format!(
                        "@approvers(\"{value}\"): the number of approvers is a whole number from 1 to {MAX_APPROVERS}, e.g. @approvers(\"2\")"
                    )),
                }
            }
            if let Some(value) = policy.annotation("approval_timeout") {
                match parse_timeout(value) {
                    Some(secs) => m.approval_timeout_secs = Some(secs),
                    None => fail(format!(
                        "@approval_timeout(\"{value}\"): write a whole number followed by s, m or h (e.g. \"90s\", \"5m\", \"1h\"), from 1 second to 24 hours"
                    )),
                }
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
                        "unknown annotation @{key} (Gatehouse reads @id, @reason, @approval, @approvers, @approval_timeout, @read_only)"
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

/// `@approvers`: digits only, 1..=[`MAX_APPROVERS`].
fn parse_approvers(value: &str) -> Option<u32> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_APPROVERS).contains(n))
}

/// `@approval_timeout`: digits then `s`, `m` or `h`, in seconds, from 1 s
/// to [`MAX_APPROVAL_TIMEOUT_SECS`].
fn parse_timeout(value: &str) -> Option<u32> {
    let secs = parse_duration(value)?;
    u32::try_from(secs)
        .ok()
        .filter(|s| (1..=MAX_APPROVAL_TIMEOUT_SECS).contains(s))
}

/// A duration as Gatehouse writes them, in seconds: a whole number
/// followed by `s`, `m` or `h` (`"90s"`, `"5m"`, `"1h"`).
pub fn parse_duration(value: &str) -> Option<u64> {
    let unit = match value.as_bytes().last()? {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        _ => return None,
    };
    let digits = &value[..value.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvers_are_whole_numbers_from_one_to_ten() {
        assert_eq!(parse_approvers("1"), Some(1));
        assert_eq!(parse_approvers("10"), Some(10));
        assert_eq!(parse_approvers("03"), Some(3));
        for bad in [
            "",
            "0",
            "11",
            "+2",
            "-1",
            " 2",
            "2 ",
            "two",
            "1.5",
            "99999999999",
        ] {
            assert_eq!(parse_approvers(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn timeouts_are_a_number_and_a_unit_within_a_day() {
        assert_eq!(parse_timeout("1s"), Some(1));
        assert_eq!(parse_timeout("90s"), Some(90));
        assert_eq!(parse_timeout("5m"), Some(300));
        assert_eq!(parse_timeout("1h"), Some(3600));
        assert_eq!(parse_timeout("24h"), Some(86_400));
        assert_eq!(parse_timeout("1440m"), Some(86_400));
        for bad in [
            "",
            "s",
            "0s",
            "0h",
            "25h",
            "86401s",
            "1441m",
            "5x",
            "5",
            "5 m",
            "+5m",
            "-5m",
            "5M",
            "1.5h",
            "99999999999999999999h",
            "5ms",
            "é",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }
}
