//! A small configuration shared by the engine tests: written to a temporary
//! folder (policy files are read from disk) and built on a manual clock.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use portcullis_config::LoadedConfig;
use portcullis_core::{Engine, ManualClock, Timestamp};

pub const START: Timestamp = Timestamp(1_767_225_600_000);

pub const CONFIG: &str = r#"
[[upstreams]]
name = "wh"
transport = "stdio"
command = ["wh-server"]

[[tools]]
name = "wh.read"
upstream = "wh"
risk = "low"
access = "read"
args_schema = { type = "object", properties = { q = { type = "string" }, limit = { type = "integer" } }, required = ["q"] }

[[tools]]
name = "wh.write"
upstream = "wh"
risk = "high"
access = "write"
# Closed: the unscoped `bounded` policy reads `limit`, which this tool does
# not declare; admitting it undeclared would be a finding.
args_schema = { type = "object", properties = { table = { type = "string" } }, required = ["table"], additionalProperties = false }

[[tools]]
name = "wh.check"
upstream = "wh"
risk = "low"
access = "read"

[[tools]]
name = "wh.admin"
upstream = "wh"
risk = "high"
access = "write"

[[agent_types]]
name = "etl"
initial = "a"
auto_advance = true
states = [
  { name = "a",   tools = ["wh.read", "wh.check"], next = ["b"] },
  { name = "b",   tools = ["wh.write", "wh.admin"], next = ["a", "end"], reverify = true },
  { name = "end", final = true },
]

[[agent_types]]
name = "manual"
initial = "a"
states = [
  { name = "a",   tools = ["wh.read"], next = ["b"] },
  { name = "b",   tools = ["wh.write"], next = ["end"] },
  { name = "end", final = true },
]

[[agents]]
id = "bot"
type = "etl"
tools = ["wh.read", "wh.write", "wh.check"]
bootstrap_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
limits = { max_calls_per_task = 6, per_tool = { "wh.write" = 2 } }

[[agents]]
id = "stepper"
type = "manual"
tools = ["wh.read", "wh.write"]
bootstrap_sha256 = "1111111111111111111111111111111111111111111111111111111111111111"

[policies]
cedar = ["policies/*.cedar"]
"#;

pub const POLICIES: &str = r#"
@id("no-secrets")
forbid(principal, action, resource == Tool::"wh.read")
when { context.args.q like "*secret*" };

@id("bounded")
forbid(principal, action, resource)
when { context.args has limit && context.args.limit > 100 };

// Overflows for any limit ≥ 1: a policy that validates but fails at run time.
@id("overflows")
forbid(principal, action, resource == Tool::"wh.read")
when { context.args has limit && context.args.limit < 0 && context.args.limit + 9223372036854775807 > 0 || context.args has limit && context.args.limit == 42 && context.args.limit * 9223372036854775807 > 0 };

@id("no-prod-writes")
forbid(principal, action, resource == Tool::"wh.write")
when { context.args.table == "prod" };

@id("stepper-never-writes-in-a")
forbid(principal, action, resource)
when { principal.type == "manual" && resource.access == "write" && context.task.state == "a" };
"#;

/// Writes `config` and `policies` into `dir` and loads them.
pub fn load_in(dir: &Path, config: &str, policies: &str) -> LoadedConfig {
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/p.cedar"), policies).unwrap();
    let file = dir.join("portcullis.toml");
    std::fs::write(&file, config).unwrap();
    LoadedConfig::load(&file).unwrap_or_else(|f| panic!("{f}"))
}

/// The shared fixture's engine, its clock, and the folder that must outlive it.
pub fn engine() -> (Engine, Arc<ManualClock>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let loaded = load_in(dir.path(), CONFIG, POLICIES);
    let clock = Arc::new(ManualClock::new(START));
    let engine = portcullis_core::build(&loaded, clock.clone()).unwrap_or_else(|f| panic!("{f}"));
    (engine, clock, dir)
}
