//! What GPUs a domain asks for: from its own XML (`<metadata><gpupass:gpus …/>`), from a config
//! rule matching its name, or from command-line flags. Pure: turns fields into an
//! [`AttachRequest`]; the XML scan that finds the fields lives in `xml::rewrite`.
//!
//! ```xml
//! <metadata>
//!   <gpupass:gpus xmlns:gpupass="https://gpupass.dev/xmlns/1" count="2" model="10de:2330"/>
//!   <!-- or alias="K4200" (from the config), or profile="vf" count="1" (SR-IOV virtual
//!        functions; model is then the VF's vendor:device), or explicit GPUs: -->
//!   <gpupass:gpus xmlns:gpupass="https://gpupass.dev/xmlns/1">
//!     <gpupass:gpu address="0000:18:00.0"/>
//!   </gpupass:gpus>
//! </metadata>
//! ```

use crate::alloc::plan::AttachRequest;
use crate::config::{GpupassConfig, RuleConfig};
use crate::model::{PciAddress, PciId};

/// The XML namespace of gpupass's metadata element.
pub const XMLNS: &str = "https://gpupass.dev/xmlns/1";

/// Most GPUs one request may ask for.
pub const MAX_COUNT: usize = 256;

/// Errors from reading a request.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The request's fields are inconsistent or malformed.
    #[error("invalid GPU request: {0}")]
    Invalid(String),
}

/// The raw fields of a request, as written in metadata or a rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSpec {
    /// `count`.
    pub count: Option<String>,
    /// `model` (`VVVV:DDDD`).
    pub model: Option<String>,
    /// `alias` (a name from the config's `[aliases]`).
    pub alias: Option<String>,
    /// Explicit GPU addresses.
    pub gpus: Vec<String>,
    /// Who the domain belongs to (limits, usage).
    pub owner: Option<String>,
    /// `profile`: a fraction of a GPU instead of whole GPUs; only `vf` (SR-IOV virtual
    /// functions) so far.
    pub profile: Option<String>,
}

fn invalid(msg: impl Into<String>) -> RequestError {
    RequestError::Invalid(msg.into())
}

/// Builds a request from its fields, resolving an alias through the config.
pub fn from_spec(
    spec: &RequestSpec,
    config: &GpupassConfig,
) -> Result<AttachRequest, RequestError> {
    if let Some(p) = &spec.profile {
        if p != "vf" {
            return Err(invalid(format!(
                "profile '{p}' is not known: only 'vf' (SR-IOV virtual functions) is"
            )));
        }
        if !spec.gpus.is_empty() || spec.alias.is_some() {
            return Err(invalid(
                "profile 'vf' takes count and model (the VF's vendor:device), not GPU addresses or an alias",
            ));
        }
    }
    if !spec.gpus.is_empty() {
        if spec.count.is_some() || spec.model.is_some() || spec.alias.is_some() {
            return Err(invalid(
                "give either GPU addresses or count/model/alias, not both",
            ));
        }
        let addrs = spec
            .gpus
            .iter()
            .map(|g| g.parse::<PciAddress>().map_err(|e| invalid(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.len() > MAX_COUNT {
            return Err(invalid(format!("more than {MAX_COUNT} GPUs")));
        }
        return Ok(AttachRequest::Gpus(addrs));
    }
    let model =
        match (&spec.model, &spec.alias) {
            (Some(_), Some(_)) => return Err(invalid("give model or alias, not both")),
            (Some(m), None) => Some(m.parse::<PciId>().map_err(|e| invalid(e.to_string()))?),
            (None, Some(a)) => Some(config.aliases.get(a).and_then(|al| al.id()).ok_or_else(
                || invalid(format!("unknown alias '{a}' (define it under [aliases])")),
            )?),
            (None, None) => None,
        };
    let count = match &spec.count {
        Some(c) => c
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_COUNT).contains(n))
            .ok_or_else(|| invalid(format!("count '{c}' is not a number from 1 to {MAX_COUNT}")))?,
        // A model or alias alone asks for one GPU of it.
        None if model.is_some() => 1,
        // `profile='vf'` alone asks for one VF.
        None if spec.profile.is_some() => 1,
        None => {
            return Err(invalid(
                "it names no GPUs: give count, model, alias or gpu addresses",
            ))
        }
    };
    Ok(match spec.profile {
        Some(_) => AttachRequest::VfCount { count, model },
        None => AttachRequest::Count { count, model },
    })
}

/// The request of a config rule.
pub fn from_rule(rule: &RuleConfig, config: &GpupassConfig) -> Result<AttachRequest, RequestError> {
    if rule.hgx_full {
        if rule.count.is_some()
            || rule.model.is_some()
            || rule.alias.is_some()
            || !rule.gpus.is_empty()
        {
            return Err(invalid(
                "hgx_full takes the whole HGX fabric: give no count, model, alias or gpus with it",
            ));
        }
        return Ok(AttachRequest::HgxFull);
    }
    from_spec(
        &RequestSpec {
            count: rule.count.map(|c| c.to_string()),
            model: rule.model.clone(),
            alias: rule.alias.clone(),
            gpus: rule.gpus.clone(),
            owner: rule.owner.clone(),
            profile: None,
        },
        config,
    )
}

/// A domain's owner: its metadata's `owner`, else the first config rule for its name that names
/// one.
pub fn owner_for(
    name: &str,
    metadata_owner: Option<&str>,
    config: &GpupassConfig,
) -> Option<String> {
    metadata_owner
        .map(str::to_owned)
        .or_else(|| config.rule_owner(name).map(str::to_owned))
}

/// A domain's request: its own metadata when present, else the first config rule matching its
/// name, else none.
pub fn for_domain(
    name: &str,
    metadata: Option<&RequestSpec>,
    config: &GpupassConfig,
) -> Result<Option<AttachRequest>, RequestError> {
    if let Some(spec) = metadata {
        return from_spec(spec, config).map(Some);
    }
    for rule in &config.rules {
        let matches = glob::Pattern::new(&rule.domain)
            .map(|p| p.matches(name))
            .unwrap_or(false);
        if matches {
            return from_rule(rule, config).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AliasConfig;

    fn config() -> GpupassConfig {
        let mut c = GpupassConfig::default();
        c.aliases.insert(
            "K4200".into(),
            AliasConfig {
                vendor_id: "10de".into(),
                product_id: "11b4".into(),
            },
        );
        c.rules.push(RuleConfig {
            domain: "i-2-*-VM".into(),
            count: Some(1),
            model: None,
            alias: Some("K4200".into()),
            gpus: vec![],
            owner: None,
            hgx_full: false,
        });
        c
    }

    fn spec(
        count: Option<&str>,
        model: Option<&str>,
        alias: Option<&str>,
        gpus: &[&str],
    ) -> RequestSpec {
        RequestSpec {
            count: count.map(Into::into),
            model: model.map(Into::into),
            alias: alias.map(Into::into),
            gpus: gpus.iter().map(|s| s.to_string()).collect(),
            owner: None,
            profile: None,
        }
    }

    #[test]
    fn an_hgx_full_rule_asks_for_the_whole_fabric_and_nothing_else() {
        let c = config();
        let mut rule = c.rules[0].clone();
        rule.count = None;
        rule.alias = None;
        rule.hgx_full = true;
        assert_eq!(from_rule(&rule, &c).unwrap(), AttachRequest::HgxFull);
        rule.count = Some(2);
        let e = from_rule(&rule, &c).unwrap_err().to_string();
        assert!(e.contains("hgx_full takes the whole HGX fabric"), "{e}");
    }

    #[test]
    fn reads_count_model_alias_and_addresses() {
        let c = config();
        assert_eq!(
            from_spec(&spec(Some("2"), Some("10de:2330"), None, &[]), &c).unwrap(),
            AttachRequest::Count {
                count: 2,
                model: Some("10de:2330".parse().unwrap())
            }
        );
        assert_eq!(
            from_spec(&spec(None, None, Some("K4200"), &[]), &c).unwrap(),
            AttachRequest::Count {
                count: 1,
                model: Some("10de:11b4".parse().unwrap())
            }
        );
        assert_eq!(
            from_spec(&spec(None, None, None, &["0000:18:00.0"]), &c).unwrap(),
            AttachRequest::Gpus(vec!["0000:18:00.0".parse().unwrap()])
        );
    }

    #[test]
    fn rejects_inconsistent_requests() {
        let c = config();
        for (s, why) in [
            (spec(Some("0"), None, None, &[]), "count '0'"),
            (spec(Some("x"), None, None, &[]), "count 'x'"),
            (spec(Some("1000"), None, None, &[]), "1 to 256"),
            (spec(None, None, None, &[]), "names no GPUs"),
            (
                spec(Some("1"), Some("10de:2330"), Some("K4200"), &[]),
                "not both",
            ),
            (spec(Some("1"), None, None, &["0000:18:00.0"]), "not both"),
            (spec(None, None, Some("nope"), &[]), "unknown alias"),
            (spec(None, None, None, &["../x"]), "invalid PCI address"),
            (spec(None, Some("10de"), None, &[]), "invalid PCI ID"),
        ] {
            let err = from_spec(&s, &c).unwrap_err().to_string();
            assert!(err.contains(why), "{s:?}: {err}");
        }
    }

    #[test]
    fn metadata_wins_over_rules_and_rules_match_by_glob() {
        let c = config();
        let meta = spec(Some("2"), None, None, &[]);
        assert_eq!(
            for_domain("i-2-34-VM", Some(&meta), &c).unwrap(),
            Some(AttachRequest::Count {
                count: 2,
                model: None
            })
        );
        assert!(matches!(
            for_domain("i-2-34-VM", None, &c).unwrap(),
            Some(AttachRequest::Count { count: 1, .. })
        ));
        assert_eq!(for_domain("i-3-34-VM", None, &c).unwrap(), None);
        assert_eq!(for_domain("r-7-VM", None, &c).unwrap(), None);
    }

    #[test]
    fn profile_vf_asks_for_virtual_functions() {
        let c = GpupassConfig::default();
        let mut vf = spec(Some("2"), Some("8086:56c0"), None, &[]);
        vf.profile = Some("vf".into());
        assert_eq!(
            from_spec(&vf, &c).unwrap(),
            AttachRequest::VfCount {
                count: 2,
                model: Some("8086:56c0".parse().unwrap()),
            }
        );
        let mut one = spec(None, None, None, &[]);
        one.profile = Some("vf".into());
        assert_eq!(
            from_spec(&one, &c).unwrap(),
            AttachRequest::VfCount {
                count: 1,
                model: None
            }
        );
        let mut other = one.clone();
        other.profile = Some("GRID T4-2Q".into());
        assert!(from_spec(&other, &c)
            .unwrap_err()
            .to_string()
            .contains("profile 'GRID T4-2Q' is not known"));
        let mut addrs = spec(None, None, None, &["0000:4d:00.1"]);
        addrs.profile = Some("vf".into());
        assert!(from_spec(&addrs, &c).is_err());
    }
}
