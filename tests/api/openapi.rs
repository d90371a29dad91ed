//! The published contract: `data/openapi.json` is a well-formed OpenAPI 3.1 document, names
//! exactly the routes the router knows, and the server serves it, byte for byte and without an
//! API key, at `GET /openapi.json`. (Whether the server behaves as the document says is the fuzz
//! run's job, `.ci/fuzz-api`.)

use std::collections::BTreeSet;

use paytrace::edge::routes::{self, Methods};
use serde_json::Value;

use crate::helpers::*;

const DOCUMENT: &str = include_str!("../../data/openapi.json");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("data/openapi.json is JSON")
}

/// The value a local `$ref` (`#/a/b`) points at, if it resolves.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// Follows `$ref`s until a value without one (at most a few hops).
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..8 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => v = resolve(doc, r).unwrap_or_else(|| panic!("unresolved $ref {r}")),
            None => return v,
        }
    }
    panic!("a $ref chain longer than 8")
}

/// Every `$ref` in `v`, with the JSON pointer of where it sits.
fn refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    out.push((at.to_string(), child.as_str().unwrap_or("").to_string()));
                } else {
                    refs(child, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                refs(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// Each operation: (method, path template, operation object).
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for (method, op) in item.as_object().expect("a path item is an object") {
            if METHODS.contains(&method.as_str()) {
                ops.push((method.clone(), path.clone(), op));
            }
        }
    }
    ops
}

#[test]
fn the_document_is_well_formed_openapi_3_1() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("an `openapi` field");
    assert!(version.starts_with("3.1."), "openapi: {version}");
    for field in ["title", "version"] {
        assert!(doc["info"][field].is_string(), "info.{field}");
    }

    let mut all = Vec::new();
    refs(&doc, "#", &mut all);
    assert!(all.len() > 50, "the document shares its parts by $ref");
    for (at, reference) in &all {
        assert!(
            reference.starts_with("#/") && resolve(&doc, reference).is_some(),
            "{at}: $ref {reference:?} does not resolve within the document"
        );
    }

    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    let mut operation_ids = BTreeSet::new();
    let ops = operations(&doc);
    assert!(!ops.is_empty());
    for (method, path, op) in &ops {
        let name = format!("{} {path}", method.to_uppercase());
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: operationId"));
        assert!(operation_ids.insert(id), "{name}: operationId {id} twice");

        let responses = op["responses"].as_object().expect("responses");
        assert!(!responses.is_empty(), "{name}: no responses");
        for (status, response) in responses {
            assert!(
                status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()),
                "{name}: response key {status}"
            );
            let response = deref(&doc, response);
            assert!(
                response["description"].is_string(),
                "{name} {status}: description"
            );
            let content = response["content"].as_object();
            assert!(
                content.is_some_and(|c| !c.is_empty()),
                "{name} {status}: every answer of paytrace has a body"
            );
            if status.starts_with(['4', '5']) {
                assert!(
                    content.is_some_and(|c| c.contains_key("application/problem+json")),
                    "{name} {status}: errors are application/problem+json"
                );
            }
            let headers = response["headers"].as_object();
            for h in ["X-Request-Id", "Server-Timing"] {
                assert!(
                    headers.is_some_and(|hs| hs.contains_key(h)),
                    "{name} {status}: every answer carries {h}"
                );
            }
        }

        // Every `{name}` of the template is a required path parameter, and nothing else is.
        let in_template: BTreeSet<&str> = path
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(n, _)| n))
            .collect();
        let mut declared = BTreeSet::new();
        for p in op["parameters"].as_array().into_iter().flatten() {
            let p = deref(&doc, p);
            assert!(p["name"].is_string() && p["in"].is_string(), "{name}: {p}");
            assert!(
                p["schema"].is_object(),
                "{name}: parameter {} has a schema",
                p["name"]
            );
            if p["in"] == "path" {
                assert_eq!(p["required"], true, "{name}: path parameters are required");
                declared.insert(p["name"].as_str().unwrap_or(""));
            }
        }
        assert_eq!(declared, in_template, "{name}: path parameters");

        for requirement in op["security"].as_array().into_iter().flatten() {
            for scheme in requirement.as_object().expect("a requirement").keys() {
                assert!(schemes.contains_key(scheme), "{name}: security {scheme}");
            }
        }
    }

    // Links name operations that exist, with parameters those operations declare.
    for (method, path, op) in &ops {
        for (status, response) in op["responses"].as_object().expect("responses") {
            for (link_name, link) in deref(&doc, response)["links"]
                .as_object()
                .into_iter()
                .flatten()
            {
                let target = link["operationId"].as_str().expect("links by operationId");
                let (_, _, target_op) = ops
                    .iter()
                    .find(|(_, _, o)| o["operationId"] == target)
                    .unwrap_or_else(|| panic!("{method} {path} {status} {link_name}: no {target}"));
                let names: Vec<String> = target_op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| deref(&doc, p)["name"].as_str().unwrap_or("").to_string())
                    .collect();
                for parameter in link["parameters"]
                    .as_object()
                    .expect("link parameters")
                    .keys()
                {
                    assert!(
                        names.contains(parameter),
                        "{link_name}: {target} has no {parameter}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_document_names_exactly_the_routes_the_router_knows() {
    let doc = document();
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    // HEAD aside: every GET route also answers HEAD, which the document says once in its
    // description rather than as an operation per route.
    let known: BTreeSet<(String, String)> = routes::ROUTES
        .iter()
        .map(|r| {
            let method = match r.methods {
                Methods::Read => "get",
                Methods::Post => "post",
                Methods::Put => "put",
            };
            (method.to_string(), r.template.to_string())
        })
        .collect();
    assert_eq!(documented, known);
}

#[test]
fn every_problem_code_the_server_has_is_documented() {
    let doc = document();
    let mut codes = BTreeSet::new();
    for schema in doc["components"]["schemas"]
        .as_object()
        .expect("schemas")
        .values()
    {
        for part in schema["allOf"].as_array().into_iter().flatten() {
            for code in part["properties"]["code"]["enum"]
                .as_array()
                .into_iter()
                .flatten()
            {
                codes.insert(code.as_str().unwrap_or("").to_string());
            }
        }
    }
    // The slugs `src/error.rs` and the 402 of `src/flow/outcome.rs` send, and the live page's
    // controls' own (`problem(info, status, "code", …)` in `src/edge/live/mod.rs`, the code on
    // the line after the status), except the two that belong to no operation (404 for an
    // unknown path, 405 for a known path's other method).
    let source = [
        include_str!("../../src/error.rs"),
        include_str!("../../src/flow/outcome.rs"),
    ]
    .concat();
    let mut sent = BTreeSet::new();
    let live: Vec<&str> = include_str!("../../src/edge/live/mod.rs").lines().collect();
    for pair in live.windows(2) {
        let status = pair[0].trim().trim_end_matches(',');
        if status.len() == 3
            && status.bytes().all(|b| b.is_ascii_digit())
            && let Some(code) = pair[1].trim().strip_prefix('"')
            && let Some((code, _)) = code.split_once('"')
        {
            sent.insert(code.to_string());
        }
    }
    for line in source.lines() {
        if let Some((_, rest)) = line.split_once("=> \"")
            && let Some((code, _)) = rest.split_once('"')
            && !code.is_empty()
            && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            sent.insert(code.to_string());
        }
        if let Some((_, rest)) = line.split_once("\"code\": \"") {
            sent.insert(rest.split('"').next().unwrap_or("").to_string());
        }
    }
    sent.remove("method-not-allowed");
    assert!(
        sent.len() > 15,
        "the slugs were read from the source: {sent:?}"
    );
    assert_eq!(
        codes, sent,
        "documented codes vs the codes the server sends"
    );
}

#[test]
fn the_server_serves_the_document_as_it_is_in_the_repository_without_a_key() {
    let serve = Serve::start(&[]);
    let mut r = agent()
        .get(format!("{}/openapi.json", serve.url()))
        .call()
        .expect("an answer");
    assert_eq!(r.status().as_u16(), 200);
    let header = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(header("Content-Type").as_deref(), Some("application/json"));
    assert!(header("X-Request-Id").is_some());
    assert!(header("Server-Timing").is_some_and(|t| t.contains("total;dur=")));
    let body = r.body_mut().read_to_string().expect("a UTF-8 body");
    assert!(
        body == DOCUMENT,
        "the served document differs from data/openapi.json"
    );
}

/// Found by the fuzz run: the document's `amount` is a JSON Schema `integer`, which a number
/// with no fractional part written as `1999.0` is; the server refused it with 400. It is that
/// integer now, and charged as such.
#[test]
fn a_whole_amount_written_with_a_fraction_is_that_integer() {
    let serve = Serve::start(&[]);
    let r = pay(
        serve.url(),
        "whole-amount",
        r#"{"amount":1999.0,"currency":"usd","source":"tok_visa"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["amount"], 1999);
    // The same payment written as an integer is the same request: replayed, not reused.
    let again = pay(
        serve.url(),
        "whole-amount",
        r#"{"amount":1999,"currency":"usd","source":"tok_visa"}"#,
    );
    assert_eq!(again.status, 201, "{}", again.body);
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(again.body["id"], r.body["id"]);
    let fraction = pay(
        serve.url(),
        "fraction",
        r#"{"amount":1999.5,"currency":"usd","source":"tok_visa"}"#,
    );
    assert_eq!(fraction.status, 400);
    assert_eq!(fraction.body["errors"][0]["field"], "amount");
}
