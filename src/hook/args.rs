//! The operations libvirt's qemu hook passes as `OP SUBOP` (docs/hooks.rst).

/// One hook call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOp {
    /// `prepare begin`: before resources are allocated; a non-zero exit blocks the start.
    Prepare,
    /// `start begin`.
    Start,
    /// `started begin`: QEMU runs.
    Started,
    /// `stopped end`.
    Stopped,
    /// `release end`: resources released (also after a blocked start).
    Release,
    /// `migrate begin`: incoming migration; printed XML replaces the domain's.
    Migrate,
    /// `restore begin`: restore from a saved image; printed XML replaces the domain's.
    Restore,
    /// `reconnect begin`: the daemon restarted while the domain ran.
    Reconnect,
    /// Anything else.
    Other(String),
}

impl HookOp {
    /// Parses `OP SUBOP`.
    pub fn parse(op: &str, subop: &str) -> Self {
        match (op, subop) {
            ("prepare", "begin") => HookOp::Prepare,
            ("start", "begin") => HookOp::Start,
            ("started", "begin") => HookOp::Started,
            ("stopped", "end") => HookOp::Stopped,
            ("release", "end") => HookOp::Release,
            ("migrate", "begin") => HookOp::Migrate,
            ("restore", "begin") => HookOp::Restore,
            ("reconnect", "begin") => HookOp::Reconnect,
            _ => HookOp::Other(format!("{op} {subop}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirts_operations() {
        assert_eq!(HookOp::parse("prepare", "begin"), HookOp::Prepare);
        assert_eq!(HookOp::parse("release", "end"), HookOp::Release);
        assert_eq!(HookOp::parse("restore", "begin"), HookOp::Restore);
        assert_eq!(
            HookOp::parse("prepare", "end"),
            HookOp::Other("prepare end".into())
        );
        assert_eq!(HookOp::parse("", ""), HookOp::Other(" ".into()));
    }
}
