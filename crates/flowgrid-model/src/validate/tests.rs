use proptest::prelude::*;

use super::*;
use crate::definition::{ChoiceRule, ChoiceStep, RetryPolicy, StartRate, TaskStep, WhenFull};
use crate::plan::{Edge, EdgeWhen};

const MEDIA_FLOW: &str = r#"
name: media
output: '#{result: steps.merge.output}'
steps:
  - id: fetch
    kind: task
    pool: cpu-media
    task: fetch
  - id: route
    kind: choice
    after: [fetch]
    choices:
      - when: 'steps.fetch.output.kind == "video"'
        next: transcode
    default: thumb
  - id: transcode
    kind: task
    pool: gpu
    task: transcode
    retry: { max_attempts: 5, initial_backoff_ms: 100 }
    catch:
      - errors: [bad_codec]
        next: fallback
  - id: fallback
    kind: transform
    output: 'steps.transcode.error.message'
  - id: thumb
    kind: map
    pool: cpu-media
    task: thumb
    items: 'steps.fetch.output.frames'
    input: '#{frame: item, position: index}'
    output: 'result.len()'
  - id: merge
    kind: transform
    after: [transcode, thumb]
    output: '#{video: steps.transcode.output, thumbs: steps.thumb.output}'
"#;

fn limits() -> Limits {
    Limits::default()
}

fn evaluator() -> Evaluator {
    Evaluator::new(&limits())
}

fn parse(text: &str) -> FlowDefinition {
    parse_definition(text, &limits()).unwrap_or_else(|error| panic!("{error}"))
}

/// `definition` against the rules for new deployments.
fn new_rules(definition: &FlowDefinition) -> crate::error::Result<()> {
    check_new(definition, &evaluator(), &limits())
}

/// The issues of a definition that must be invalid.
fn issues_of(text: &str) -> Vec<Issue> {
    match validate(&parse(text), &evaluator(), &limits()) {
        Err(DefinitionError::Invalid(issues)) => issues,
        other => panic!("expected issues, got {other:?}"),
    }
}

fn assert_issue(issues: &[Issue], path: &str, phrase: &str) {
    assert!(
        issues.iter().any(|issue| issue.path == path && issue.message.contains(phrase)),
        "no issue at `{path}` containing `{phrase}` in {issues:#?}"
    );
}

/// A one-step flow whose step is `step` (YAML mapping lines, indented by four spaces).
fn one_task_flow(extra: &str) -> String {
    format!("name: f\nsteps:\n  - id: a\n    kind: task\n    pool: p\n    task: t\n{extra}")
}

#[test]
fn yaml_and_json_parse_to_the_same_model() {
    let from_yaml = parse(MEDIA_FLOW);
    let json = serde_json::to_string_pretty(&from_yaml).unwrap();
    assert_eq!(parse(&json), from_yaml);
    assert_eq!(from_yaml.steps.len(), 6);
    validate(&from_yaml, &evaluator(), &limits()).unwrap();
    // A byte order mark before either (a file saved by some editors) is no part of it.
    assert_eq!(parse(&format!("\u{feff}{MEDIA_FLOW}")), from_yaml);
    assert_eq!(parse(&format!("\u{feff}{json}")), from_yaml);
}

#[test]
fn unknown_field_is_an_issue_naming_it_with_its_place() {
    let text = one_task_flow("    retyr: { max_attempts: 2 }\n");
    let error = parse_definition(&text, &limits()).unwrap_err();
    let message = error.to_string();
    assert_eq!(error.issues().len(), 1, "{message}");
    assert!(error.issues()[0].path.ends_with(".retyr"), "{message}");
    assert!(message.contains("retyr") && message.contains("line"), "{message}");
    let json = r#"{"name": "f", "steps": [{"id": "a", "kind": "task", "pool": "p", "task": "t", "retry": {"max_attemps": 2}}]}"#;
    let message = parse_definition(json, &limits()).unwrap_err().to_string();
    assert!(message.contains("max_attemps") && message.contains("line 1"), "{message}");
}

#[test]
fn every_mistake_against_the_model_is_reported_at_once() {
    let text = "name: f\nversion: 1\nsteps:\n  - { id: a, kind: task, pool: p, task: t, retires: 3 }\n  - { id: b, \
                kind: tsk }\n  - { id: c, kind: wait, duration_ms: abc }\n  - { id: d, kind: task, pool: p, task: t, \
                retry: { max_attempts: x } }\n  - { id: e, kind: wait, duration_ms: 5 }\n";
    let DefinitionError::Invalid(issues) = parse_definition(text, &limits()).unwrap_err() else {
        panic!("several mistakes are listed as issues")
    };
    let paths: Vec<&str> = issues.iter().map(|issue| issue.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "version",
            "steps[0](a).retires",
            "steps[1](b).kind",
            "steps[2](c).duration_ms",
            "steps[3](d).retry.max_attempts"
        ]
    );
    // The mistake the parser stopped at keeps its place in the text; the others name their field.
    assert!(issues[0].message.contains("`version`") && issues[0].message.contains("line 2"), "{issues:?}");
    assert!(issues[2].message.contains("unknown variant `tsk`"), "{issues:?}");
    assert!(issues[4].message.contains("expected u32"), "{issues:?}");
    let json = r#"{"name": "f", "steps": [{"id": "a", "kind": "task", "pool": "p"}, {"kind": 5}]}"#;
    let issues = parse_definition(json, &limits()).unwrap_err().issues();
    assert_eq!(issues.len(), 2, "{issues:?}");
    assert!(
        issues[0].path == "steps[0](a)" && issues[0].message.contains("missing field `task` (line 1"),
        "{issues:?}"
    );
    assert_eq!(issues[1].path, "steps[1].kind");
    // Text that is not YAML at all has one error, where the parser stopped.
    let error = parse_definition("name: [\n", &limits()).unwrap_err();
    assert!(matches!(error, DefinitionError::Parse(_)), "{error}");
}

#[test]
fn a_variable_the_field_does_not_have_is_refused_where_it_is_read() {
    let text = r##"
name: scoped
steps:
  - { id: a, kind: task, pool: p, task: t, input: "item", output: "result.x + index" }
  - { id: b, kind: transform, output: "result" }
  - { id: c, kind: transform, output: "input.list.map(|item| item * 2)" }
  - { id: m, kind: map, pool: p, task: t, items: "input.list", input: "#{ i: item, n: index }", output: "result" }
  - { id: l, kind: subflow, flow: body, input: "previous ?? iteration", repeat: { until: "result.done && previous" } }
  - { id: s, kind: subflow, flow: body, items: "input.list", input: "item + iteration" }
"##;
    let definition = parse(text);
    let issues = validate(&definition, &evaluator(), &limits()).unwrap_err().issues();
    let found: Vec<String> = issues.iter().map(ToString::to_string).collect();
    let expected = [
        "steps[0](a).input: reads `item`",
        "steps[0](a).output: reads `index`",
        "steps[1](b).output: reads `result`",
        "steps[4](l).repeat.until: reads `previous`",
        "steps[5](s).input: reads `iteration`",
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for (issue, expected) in found.iter().zip(expected) {
        assert!(issue.starts_with(expected), "{issue} is not {expected}");
    }
}

#[test]
fn a_variable_no_field_has_is_refused_listing_what_the_field_reads() {
    let text = r##"
name: misspelt
steps:
  - { id: a, kind: transform, output: "inptu.total" }
  - { id: b, kind: transform, output: "[1].map(|x| x + inptu.k)" }
  - { id: c, kind: task, pool: p, task: t, output: "reslt.x" }
  - { id: m, kind: map, pool: p, task: t, items: "input.l", input: "#{ i: itme }" }
  - { id: d, kind: transform, output: "input.l.map(|x| x * 2)" }
  - { id: e, kind: transform, output: "input.l.map(|item| item + input.k).filter(|x, i| x > i)" }
"##;
    // Deployed before the rule, such a version still loads.
    assert!(validate(&parse(text), &evaluator(), &limits()).is_ok());
    let issues = check_new(&parse(text), &evaluator(), &limits()).unwrap_err().issues();
    let found: Vec<String> = issues.iter().map(ToString::to_string).collect();
    let expected = [
        "steps[0](a).output: reads `inptu`, which is no variable of expressions: this field reads `input` and `steps`",
        "steps[1](b).output: reads `inptu`, which is no variable of expressions: this field reads `input` and `steps`",
        "steps[2](c).output: reads `reslt`, which is no variable of expressions: this field reads `input`, `steps` and \
         `result`",
        "steps[3](m).input: reads `itme`, which is no variable of expressions: this field reads `input`, `steps`, \
         `item` and `index`",
    ];
    assert_eq!(found, expected, "{found:#?}");
}

#[test]
fn oversized_and_deep_definitions_are_refused() {
    let small = Limits { definition_bytes_max: 10, ..limits() };
    let message = parse_definition(MEDIA_FLOW, &small).unwrap_err().to_string();
    assert!(message.contains("over the limit of 10 bytes"), "{message}");
    let deep = format!("{{\"name\": {}1{}}}", "[".repeat(40), "]".repeat(40));
    let message = parse_definition(&deep, &limits()).unwrap_err().to_string();
    assert!(message.contains("nesting deeper than the limit of 32"), "{message}");
}

#[test]
fn a_deep_definition_is_refused_as_yaml_as_it_is_as_json() {
    let schema = format!("{}{{}}{}", "{ not: ".repeat(40), " }".repeat(40));
    let yaml = format!("name: f\ninput_schema: {schema}\nsteps:\n  - {{ kind: transform, id: t, output: '1' }}\n");
    let json = serde_json::to_string(&serde_norway::from_str::<serde_json::Value>(&yaml).unwrap()).unwrap();
    let phrase = "nesting deeper than the limit of 32 levels";
    for (format, text) in [("JSON", json), ("YAML", yaml)] {
        match parse_definition(&text, &limits()) {
            Err(DefinitionError::Parse(message)) => {
                assert!(message.starts_with(&format!("{format}: {phrase}")), "{message}");
                assert!(message.ends_with(": flatten the value"), "{message}");
            }
            other => panic!("{format}: expected the depth limit's refusal, got {other:?}"),
        }
    }
    // At the limit, both read.
    let schema = format!("{}{{}}{}", "{ not: ".repeat(30), " }".repeat(30));
    let yaml = format!("name: f\ninput_schema: {schema}\nsteps:\n  - {{ kind: transform, id: t, output: '1' }}\n");
    assert!(parse_definition(&yaml, &limits()).is_ok());
}

#[test]
fn plan_edges_follow_the_documented_semantics() {
    let plan = FlowPlan::compile(parse(MEDIA_FLOW), 7, &evaluator(), &limits()).unwrap();
    let index = |id: &str| plan.step_index(id).unwrap();
    let (fetch, route, transcode, fallback, thumb, merge) =
        (index("fetch"), index("route"), index("transcode"), index("fallback"), index("thumb"), index("merge"));
    let edge = |to, when| Edge { to, when };
    assert_eq!(plan.step(fetch).outgoing, [edge(route, EdgeWhen::Succeeded)]);
    assert_eq!(plan.step(route).outgoing, [edge(transcode, EdgeWhen::Branch(0)), edge(thumb, EdgeWhen::Default)]);
    assert_eq!(plan.step(transcode).outgoing, [edge(merge, EdgeWhen::Succeeded), edge(fallback, EdgeWhen::Caught(0))]);
    assert_eq!(plan.step(thumb).outgoing, [edge(merge, EdgeWhen::Succeeded)]);
    assert!(plan.step(fallback).outgoing.is_empty());
    assert!(plan.step(fetch).deps.is_empty());
    assert_eq!(plan.step(route).deps, [fetch]);
    assert_eq!(plan.step(transcode).deps, [route]);
    assert_eq!(plan.step(fallback).deps, [transcode]);
    assert_eq!(plan.step(thumb).deps, [route]);
    assert_eq!(plan.step(merge).deps, [transcode, thumb]);
    // `transcode`'s only edge besides `merge` is its catch: it is no sink, as `merge` follows it.
    assert_eq!(plan.sinks, [fallback, merge]);
    assert_eq!((plan.name.as_str(), plan.version), ("media", 7));
    assert_eq!(&*plan.output.as_ref().unwrap().step_refs, ["merge".to_owned()]);
}

#[test]
fn plan_applies_defaults_and_keeps_settings() {
    let plan = FlowPlan::compile(parse(MEDIA_FLOW), 1, &evaluator(), &limits()).unwrap();
    let transcode_kind = &plan.step(plan.step_index("transcode").unwrap()).kind;
    let PlanStepKind::Task(transcode) = transcode_kind else {
        panic!("transcode is a task");
    };
    assert_eq!((&*transcode.pool, &*transcode.task), ("gpu", "transcode"));
    assert_eq!((transcode.timeout_ms, transcode.priority), (TASK_TIMEOUT_MS_DEFAULT, PRIORITY_DEFAULT));
    assert_eq!((transcode.retry.max_attempts, transcode.retry.initial_backoff_ms), (5, 100));
    assert!(transcode.input.is_none() && transcode.output.is_none());
    assert_eq!(transcode_kind.catch_for("bad_codec").map(|(rule, catch)| (rule, catch.next)), Some((0, 3)));
    assert!(transcode_kind.catch_for("other").is_none());
    let PlanStepKind::Map { items, spec, max_concurrency, tolerated_failures } = &plan.step(4).kind else {
        panic!("thumb is a map");
    };
    assert_eq!(&*items.step_refs, ["fetch".to_owned()]);
    assert_eq!((*max_concurrency, *tolerated_failures), (100_000, 0), "as a version deployed before the bound");
    assert!(spec.input.is_some() && spec.output.is_some());
    let PlanStepKind::Choice { rules, default } = &plan.step(1).kind else { panic!("route is a choice") };
    assert_eq!((rules.len(), rules[0].1, *default), (1, 2, Some(4)));
}

#[test]
fn names_are_checked() {
    let issues = issues_of("name: 'bad name'\nsteps:\n  - {id: 'a.b', kind: task, pool: 'p.*', task: ''}\n");
    assert_issue(&issues, "name", "use only letters, digits");
    assert_issue(&issues, "steps[0](a.b).id", "not an identifier");
    assert_issue(&issues, "steps[0](a.b).pool", "no dots, spaces or wildcards");
    assert_issue(&issues, "steps[0](a.b).task", "must not be empty");
    let issues = issues_of(&format!("name: ''\nsteps:\n  - {{id: {}, kind: succeed}}\n", "x".repeat(200)));
    assert_issue(&issues, "name", "must not be empty");
    assert_issue(&issues, &format!("steps[0]({}).id", "x".repeat(200)), "over the limit of 128");
}

#[test]
fn step_count_is_checked() {
    assert_issue(&issues_of("name: f\nsteps: []\n"), "steps", "at least one step");
    let small = Limits { steps_max: 1, ..limits() };
    let definition = parse("name: f\nsteps:\n  - {id: a, kind: succeed}\n  - {id: b, kind: succeed}\n");
    let issues = validate(&definition, &Evaluator::new(&small), &small).unwrap_err().issues();
    assert_issue(&issues, "steps", "over the limit of 1");
}

#[test]
fn duplicate_ids_name_both_positions() {
    let issues = issues_of(
        "name: f\nsteps:\n  - {id: a, kind: succeed}\n  - {id: b, kind: succeed}\n  - {id: a, kind: succeed}\n",
    );
    assert_issue(&issues, "steps[2](a).id", "used by steps[0] and steps[2]");
}

#[test]
fn edges_must_name_other_existing_steps() {
    let issues = issues_of(
        "name: f\nsteps:\n  - {id: a, kind: task, pool: p, task: t, after: [a, zz], catch: [{next: nope}]}\n  \
         - {id: b, kind: succeed, after: [a, a]}\n  \
         - {id: c, kind: choice, choices: [{when: 'true', next: ghost}], default: c}\n",
    );
    assert_issue(&issues, "steps[0](a).after[0]", "cannot run after itself");
    assert_issue(&issues, "steps[0](a).after[1]", "names step `zz`, which does not exist");
    assert_issue(&issues, "steps[0](a).catch[0].next", "names step `nope`");
    assert_issue(&issues, "steps[1](b).after[1]", "lists `a` twice");
    assert_issue(&issues, "steps[2](c).choices[0].next", "names step `ghost`");
    assert_issue(&issues, "steps[2](c).default", "cannot branch to itself");
}

#[test]
fn cycles_report_their_path() {
    let issues = issues_of(
        "name: f\nsteps:\n  - {id: a, kind: succeed, after: [c]}\n  - {id: b, kind: succeed, after: [a]}\n  \
         - {id: c, kind: succeed, after: [b]}\n",
    );
    assert_issue(&issues, "steps[0](a)", "cycle: a -> b -> c -> a");
    // A cycle through a catch target and a choice branch.
    let issues = issues_of(
        "name: f\nsteps:\n  - {id: a, kind: task, pool: p, task: t, catch: [{next: b}]}\n  \
         - {id: b, kind: choice, choices: [{when: 'true', next: a}]}\n",
    );
    assert_issue(&issues, "steps[0](a)", "cycle: a -> b -> a");
}

#[test]
fn a_graph_of_many_cycles_reports_a_few() {
    // A chain s0 <- s1 <- ... <- s59, and each of s0..s19 after each of s40..s59: 400
    // back edges, each closing a cycle of its own.
    let mut text = String::from("name: f\nsteps:\n  - {id: s0, kind: succeed, after: [s40]}\n");
    for step in 1..60 {
        let mut after = vec![format!("s{}", step - 1)];
        if step < 20 {
            after.extend((40..60).map(|back| format!("s{back}")));
        }
        text.push_str(&format!("  - {{id: s{step}, kind: succeed, after: [{}]}}\n", after.join(", ")));
    }
    let issues = issues_of(&text);
    let cycles = issues.iter().filter(|issue| issue.message.starts_with("cycle: ")).count();
    assert_eq!(cycles, 10, "{issues:?}");
}

#[test]
fn retry_timeouts_priority_and_concurrency_are_checked() {
    let issues = issues_of(&one_task_flow(
        "    retry: {max_attempts: 0, backoff_multiplier: 0.5, jitter: 2, initial_backoff_ms: 500, max_backoff_ms: 100}\n    \
         timeout_ms: 0\n    priority: 12\n",
    ));
    assert_issue(&issues, "steps[0](a).retry.max_attempts", "use 1 to 100 attempts");
    assert_issue(&issues, "steps[0](a).retry.backoff_multiplier", "at least 1");
    assert_issue(&issues, "steps[0](a).retry.jitter", "from 0 to 1");
    assert_issue(&issues, "steps[0](a).retry.max_backoff_ms", "below initial_backoff_ms");
    assert_issue(&issues, "steps[0](a).timeout_ms", "greater than 0");
    assert_issue(&issues, "steps[0](a).priority", "from 0 to 9");
    let issues = issues_of(&one_task_flow("    retry: {max_attempts: 101}\n"));
    assert_issue(&issues, "steps[0](a).retry.max_attempts", "is 101");
    let issues = issues_of(
        "name: f\ntimeout_ms: 0\nsteps:\n  - {id: m, kind: map, pool: p, task: t, items: '[1]', max_concurrency: 0}\n  \
         - {id: c, kind: choice, choices: []}\n  - {id: x, kind: fail, error: ''}\n",
    );
    assert_issue(&issues, "timeout_ms", "greater than 0");
    assert_issue(&issues, "steps[0](m).max_concurrency", "at least 1");
    assert_issue(&issues, "steps[0](m).max_concurrency", "leave it out for the default of 10000");
    assert_issue(&issues, "steps[1](c).choices", "at least one rule");
    assert_issue(&issues, "steps[2](x).error", "must not be empty");
}

#[test]
fn expressions_must_compile_where_they_are() {
    let issues = issues_of(
        "name: f\noutput: '1 +'\nsteps:\n  - {id: a, kind: task, pool: p, task: t, input: 'let x = 1'}\n  \
         - {id: c, kind: choice, after: [a], choices: [{when: 'true', next: d}, {when: 'steps[\"a\"]', next: d}]}\n  \
         - {id: d, kind: succeed}\n",
    );
    assert_issue(&issues, "output", "does not compile");
    assert_issue(&issues, "steps[0](a).input", "does not compile");
    assert_issue(&issues, "steps[1](c).choices[1].when", "steps.<id>.output or steps.<id>.error");
}

#[test]
fn expressions_read_only_upstream_steps() {
    let issues = issues_of(
        "name: f\noutput: 'steps.nowhere.output'\nsteps:\n  - {id: thumb, kind: task, pool: p, task: t}\n  \
         - {id: merge, kind: transform, output: 'steps.thumb.output'}\n  \
         - {id: own, kind: task, pool: p, task: t, output: 'steps.own.output'}\n  \
         - {id: echo, kind: transform, output: 'steps.echo.output'}\n  \
         - {id: resize-img, kind: task, pool: p, task: t}\n  \
         - {id: use, kind: transform, after: [resize-img], output: 'steps.resize-img.output'}\n",
    );
    assert_issue(&issues, "output", "reads steps.nowhere, which does not exist");
    assert_issue(
        &issues,
        "steps[1](merge).output",
        "reads steps.thumb, which does not run before merge: add it to `after`",
    );
    assert_issue(&issues, "steps[2](own).output", "read the worker's result as `result`");
    assert_issue(&issues, "steps[3](echo).output", "its own step");
    assert_issue(&issues, "steps[5](use).output", "rename it with `_`");
}

#[test]
fn every_issue_is_reported_at_once() {
    let issues = issues_of(&one_task_flow("    priority: 10\n    timeout_ms: 0\n    after: [ghost]\n"));
    assert_eq!(issues.len(), 3, "{issues:#?}");
    let message = DefinitionError::Invalid(issues).to_string();
    assert!(message.starts_with("invalid definition (3 problems)"), "{message}");
}

fn task_step(id: String, after: Vec<String>) -> Step {
    Step::Task(TaskStep {
        id,
        after,
        when: None,
        pool: "pool".to_owned(),
        task: "work".to_owned(),
        input: None,
        output: None,
        retry: RetryPolicy::default(),
        timeout_ms: None,
        total_timeout_ms: None,
        priority: None,
        cache: None,
        catch: Vec::new(),
    })
}

/// A DAG definition: step `n` runs after a random subset of the steps before it.
fn dag_definition() -> impl Strategy<Value = FlowDefinition> {
    (1usize..24)
        .prop_flat_map(|count| {
            proptest::collection::vec(proptest::collection::vec(any::<prop::sample::Index>(), 0..4), count)
        })
        .prop_map(|parents| {
            let steps = parents
                .iter()
                .enumerate()
                .map(|(position, picks)| {
                    let mut after: Vec<String> = if position == 0 {
                        Vec::new()
                    } else {
                        picks.iter().map(|pick| format!("s{}", pick.index(position))).collect()
                    };
                    after.sort();
                    after.dedup();
                    task_step(format!("s{position}"), after)
                })
                .collect();
            FlowDefinition { name: "dag".to_owned(), steps, ..Default::default() }
        })
}

proptest! {
    #[test]
    fn random_dags_validate_and_compile(definition in dag_definition()) {
        let plan = FlowPlan::compile(definition.clone(), 1, &evaluator(), &limits());
        prop_assert!(plan.is_ok(), "{:?}", plan.err());
        let plan = plan.unwrap();
        prop_assert_eq!(plan.steps.len(), definition.steps.len());
        for (position, step) in plan.steps.iter().enumerate() {
            prop_assert!(step.deps.iter().all(|&dep| usize::from(dep) < position));
            prop_assert_eq!(step.deps.len(), definition.steps[position].after().len());
        }
    }

    #[test]
    fn a_back_edge_makes_a_cycle(definition in dag_definition(), pick in any::<prop::sample::Index>()) {
        let mut definition = definition;
        // Find a step with a dependency and make that dependency wait for it.
        let Some(position) = definition.steps.iter().rposition(|step| !step.after().is_empty()) else {
            return Ok(());
        };
        let after = definition.steps[position].after();
        let upstream_id = after[pick.index(after.len())].clone();
        let upstream = definition.steps.iter().position(|step| step.id() == upstream_id).unwrap();
        let Step::Task(task) = &mut definition.steps[upstream] else { unreachable!() };
        task.after.push(format!("s{position}"));
        let issues = validate(&definition, &evaluator(), &limits()).unwrap_err().issues();
        prop_assert!(issues.iter().any(|issue| issue.message.starts_with("cycle: ")), "{:?}", issues);
    }
}

#[test]
fn choice_targets_count_as_edges_for_references() {
    let definition = FlowDefinition {
        name: "f".to_owned(),
        steps: vec![
            task_step("a".to_owned(), Vec::new()),
            Step::Choice(ChoiceStep {
                id: "c".to_owned(),
                after: vec!["a".to_owned()],
                when: None,
                choices: vec![ChoiceRule { when: "steps.a.output == 1".to_owned(), next: "b".to_owned() }],
                default: None,
            }),
            Step::Transform(crate::definition::TransformStep {
                id: "b".to_owned(),
                after: Vec::new(),
                when: None,
                output: "steps.a.output + 1".to_owned(),
            }),
        ],
        ..Default::default()
    };
    validate(&definition, &evaluator(), &limits()).unwrap();
}

#[test]
fn step_ids_must_be_identifiers_readable_in_expressions() {
    let with_id = |id: &str| format!("name: ids\nsteps:\n  - id: {id}\n    kind: transform\n    output: '1'\n");
    let issues = issues_of(&with_id("resize-img"));
    assert_issue(&issues, "steps[0](resize-img).id", "e.g. `resize_img`");
    let issues = issues_of(&with_id("'2nd'"));
    assert_issue(&issues, "steps[0](2nd).id", "e.g. `step_2nd`");
    // One issue, suggesting a valid id, and no word of `-` (which no step id may hold).
    let issues = issues_of(&with_id("été"));
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_issue(&issues, "steps[0](été).id", "e.g. `step__t_`");
    assert!(!issues[0].message.contains('-'), "{issues:?}");
    let issues = issues_of(&with_id("loop"));
    assert_issue(&issues, "steps[0](loop).id", "keyword");
    assert!(validate(&parse(&with_id("_resize_img2")), &evaluator(), &limits()).is_ok());
}

#[test]
fn a_wait_says_how_long_in_exactly_one_way() {
    let flow = |wait: &str| {
        format!("name: f\nsteps:\n  - {{ kind: task, id: a, pool: p, task: t }}\n  - {{ kind: wait, id: w, after: [a]{wait} }}\n")
    };
    let plan = FlowPlan::compile(parse(&flow(", duration_ms: 1500")), 1, &evaluator(), &limits()).unwrap();
    assert!(matches!(plan.step(1).kind, PlanStepKind::Wait(WaitFor::Fixed(1_500))));
    let plan = FlowPlan::compile(parse(&flow(", duration: 'steps.a.output.ms'")), 1, &evaluator(), &limits()).unwrap();
    assert!(matches!(plan.step(1).kind, PlanStepKind::Wait(WaitFor::Expr(_))));

    let plan = FlowPlan::compile(parse(&flow(", until: 'steps.a.output.at'")), 1, &evaluator(), &limits()).unwrap();
    assert!(matches!(plan.step(1).kind, PlanStepKind::Wait(WaitFor::Until(_))));

    assert_issue(&issues_of(&flow("")), "steps[1](w)", "needs `duration_ms` (milliseconds), `duration`");
    assert_issue(&issues_of(&flow(", duration_ms: 1, duration: '2'")), "steps[1](w)", "takes one of");
    assert_issue(&issues_of(&flow(", duration: '1', until: '2'")), "steps[1](w)", "takes one of");
    assert_issue(&issues_of(&flow(", until: 'steps.nope.output'")), "steps[1](w).until", "nope");
    assert_issue(
        &issues_of(&flow(", duration_ms: 99999999999999")),
        "steps[1](w).duration_ms",
        "over the longest wait",
    );
    assert_issue(&issues_of(&flow(", duration: 'steps.zz.output'")), "steps[1](w).duration", "steps.zz");
    assert_issue(&issues_of(&flow(", duration: '1 +'")), "steps[1](w).duration", "does not compile");
    let message = parse_definition(&flow(", duration_ms: 10, retry: {}"), &limits()).unwrap_err().to_string();
    assert!(message.contains("unknown field `retry`"), "{message}");
}

#[test]
fn a_subflow_step_names_a_flow_compiles_its_input_and_catches_like_a_task() {
    let flow = |subflow: &str| {
        format!("name: f\nsteps:\n  - {{ kind: subflow, id: s{subflow} }}\n  - {{ kind: transform, id: late, output: '1' }}\n")
    };
    let text = flow(", flow: encode, version: 2, input: '#{ url: input.u }', catch: [{ errors: [bad], next: late }]");
    let plan = FlowPlan::compile(parse(&text), 1, &evaluator(), &limits()).unwrap();
    let PlanStepKind::Subflow(spec) = &plan.step(0).kind else { panic!("a subflow step") };
    assert_eq!((spec.flow.as_str(), spec.version, spec.input.is_some()), ("encode", Some(2), true));
    assert_eq!(plan.step(0).kind.catch_for("bad").map(|(rule, catch)| (rule, catch.next)), Some((0, 1)));
    assert_eq!(plan.step(0).outgoing, [Edge { to: 1, when: EdgeWhen::Caught(0) }]);

    let message = parse_definition(&flow(""), &limits()).unwrap_err().to_string();
    assert!(message.contains("missing field `flow`"), "{message}");
    assert_issue(&issues_of(&flow(", flow: 'a b'")), "steps[0](s).flow", "flow name");
    assert_issue(&issues_of(&flow(", flow: x, version: 0")), "steps[0](s).version", "start at 1");
    assert_issue(&issues_of(&flow(", flow: x, input: '1 +'")), "steps[0](s).input", "does not compile");
    assert_issue(&issues_of(&flow(", flow: x, catch: [{ next: nope }]")), "steps[0](s).catch[0].next", "nope");
    // Each rule is an edge of the graph: their number is bounded, not only the text's size.
    let rules = vec!["{ next: late }"; super::rules::RULES_MAX + 1].join(", ");
    assert_issue(&issues_of(&flow(&format!(", flow: x, catch: [{rules}]"))), "steps[0](s).catch", "at most 100");

    let text = flow(", flow: encode, items: 'input.videos', max_concurrency: 4, tolerated_failures: 1");
    let plan = FlowPlan::compile(parse(&text), 1, &evaluator(), &limits()).unwrap();
    let PlanStepKind::Subflow(spec) = &plan.step(0).kind else { panic!("a subflow step") };
    let items = spec.items.as_ref().expect("one child per item");
    assert_eq!((items.max_concurrency, items.tolerated_failures), (4, 1));
    assert_issue(
        &issues_of(&flow(", flow: x, items: 'input.v', max_concurrency: 0")),
        "steps[0](s).max_concurrency",
        "at least 1",
    );
    assert_issue(&issues_of(&flow(", flow: x, tolerated_failures: 2")), "steps[0](s)", "add `items`");
    assert_issue(&issues_of(&flow(", flow: x, items: '1 +'")), "steps[0](s).items", "does not compile");
    assert_issue(&issues_of(&flow(", flow: x, timeout_ms: 0")), "steps[0](s).timeout_ms", "greater than 0");
}

#[test]
fn a_loop_needs_a_condition_a_bounded_count_and_no_items() {
    let flow = |subflow: &str| format!("name: f\nsteps:\n  - {{ kind: subflow, id: s, flow: body{subflow} }}\n");
    let plan =
        FlowPlan::compile(parse(&flow(", repeat: { until: 'result.done' }")), 1, &evaluator(), &limits()).unwrap();
    let PlanStepKind::Subflow(spec) = &plan.step(0).kind else { panic!("a subflow step") };
    let repeat = spec.repeat.as_ref().expect("a loop");
    assert_eq!((repeat.until.source.as_ref(), repeat.max_iterations), ("result.done", 100));
    let text = flow(", repeat: { until: 'result.done', max_iterations: 10000 }");
    let plan = FlowPlan::compile(parse(&text), 1, &evaluator(), &limits()).unwrap();
    let PlanStepKind::Subflow(spec) = &plan.step(0).kind else { panic!("a subflow step") };
    assert_eq!(spec.repeat.as_ref().map(|repeat| repeat.max_iterations), Some(10_000));

    for max in ["0", "10001"] {
        let text = flow(&format!(", repeat: {{ until: 'true', max_iterations: {max} }}"));
        assert_issue(&issues_of(&text), "steps[0](s).repeat.max_iterations", "give 1 to 10000");
    }
    assert_issue(&issues_of(&flow(", items: 'input.v', repeat: { until: 'true' }")), "steps[0](s).repeat", "not both");
    assert_issue(&issues_of(&flow(", repeat: { until: '1 +' }")), "steps[0](s).repeat.until", "does not compile");
    assert_issue(
        &issues_of(&flow(", repeat: { until: 'steps.s.output' }")),
        "steps[0](s).repeat.until",
        "its own step",
    );
    let message = parse_definition(&flow(", repeat: { max_iterations: 3 }"), &limits()).unwrap_err().to_string();
    assert!(message.contains("missing field `until`"), "{message}");
}

#[test]
fn a_signal_step_checks_its_timeout_and_catches_like_a_task() {
    let flow = |signal: &str| {
        format!("name: f\nsteps:\n  - {{ kind: signal, id: s{signal} }}\n  - {{ kind: transform, id: late, output: '1' }}\n")
    };
    let plan = FlowPlan::compile(
        parse(&flow(", timeout_ms: 500, catch: [{ errors: [timeout], next: late }]")),
        1,
        &evaluator(),
        &limits(),
    )
    .unwrap();
    let PlanStepKind::Signal { timeout_ms, .. } = &plan.step(0).kind else { panic!("a signal step") };
    assert_eq!(*timeout_ms, Some(500));
    assert_eq!(plan.step(0).kind.catch_for("timeout").map(|(rule, catch)| (rule, catch.next)), Some((0, 1)));
    assert_eq!(plan.step(0).outgoing, [Edge { to: 1, when: EdgeWhen::Caught(0) }]);

    assert_issue(&issues_of(&flow(", timeout_ms: 0")), "steps[0](s).timeout_ms", "greater than 0");
    assert_issue(&issues_of(&flow(", catch: [{ next: nope }]")), "steps[0](s).catch[0].next", "nope");
    assert_issue(
        &issues_of(&flow(", catch: [{ errors: [], next: late }]")),
        "steps[0](s).catch[0].errors",
        "must list",
    );
}

#[test]
fn a_schedule_has_one_timetable_that_parses_and_an_input_a_run_may_take() {
    let flow = |schedule: &str| {
        format!("name: f\nschedule: {schedule}\nsteps:\n  - {{ kind: task, id: a, pool: p, task: t }}\n")
    };
    let plan =
        FlowPlan::compile(parse(&flow("{ every_ms: 60000, input: { n: 1 } }")), 1, &evaluator(), &limits()).unwrap();
    assert_eq!(plan.schedule.as_ref().and_then(|timetable| timetable.next_after(0)), Some(60_000));
    let plan = FlowPlan::compile(parse(&flow("{ cron: '0 */6 * * *' }")), 1, &evaluator(), &limits()).unwrap();
    assert!(matches!(plan.schedule, Some(crate::schedule::Timetable::Cron(_, chrono_tz::Tz::UTC))));

    assert_issue(&issues_of(&flow("{ input: 1 }")), "schedule", "needs `every_ms`");
    assert_issue(&issues_of(&flow("{ every_ms: 60000, cron: '* * * * *' }")), "schedule", "not both");
    assert_issue(&issues_of(&flow("{ every_ms: 10 }")), "schedule.every_ms", "use 1000 ms");
    assert_issue(&issues_of(&flow("{ cron: 'every monday' }")), "schedule.cron", "is not a cron expression");
    assert_issue(&issues_of(&flow("{ cron: '0 0 30 2 *' }")), "schedule.cron", "it never matches");
    assert_issue(&issues_of(&flow("{ cron: '0 9 * * *', timezone: 'Mars/Olympus' }")), "schedule.timezone", "IANA");
    // Every mistake of a schedule is told at once.
    let issues = issues_of(&flow("{ cron: '61 * * * *', timezone: 'Mars/Olympus', every_ms: 500 }"));
    assert_issue(&issues, "schedule", "not both");
    assert_issue(&issues, "schedule.every_ms", "use 1000 ms");
    assert_issue(&issues, "schedule.timezone", "IANA");
    assert_issue(&issues, "schedule.cron", "minute (0-59)");
    assert_issue(
        &issues_of(&flow("{ every_ms: 60000, timezone: 'Europe/Berlin' }")),
        "schedule.timezone",
        "with `cron`",
    );
    let berlin =
        FlowPlan::compile(parse(&flow("{ cron: '0 9 * * *', timezone: 'Europe/Berlin' }")), 1, &evaluator(), &limits());
    // 2026-01-15T00:00:00Z: nine in Berlin is 8:00 UTC in winter.
    let next = berlin.expect("valid").schedule.as_ref().and_then(|timetable| timetable.next_after(1_768_435_200_000));
    assert_eq!(next, Some(1_768_435_200_000 + 8 * 3_600_000));
    // Written out, a deep input is refused with the definition; a definition built otherwise
    // is refused at the input.
    let deep = format!("{{ every_ms: 60000, input: {}1{} }}", "[".repeat(40), "]".repeat(40));
    let message = parse_definition(&flow(&deep), &limits()).unwrap_err().to_string();
    assert!(message.contains("nesting deeper than the limit of 32 levels in `schedule`"), "{message}");
    let mut definition = parse(&flow("{ every_ms: 60000 }"));
    let schedule = definition.schedule.as_mut().expect("parsed");
    schedule.input = serde_json::from_str(&format!("{}1{}", "[".repeat(40), "]".repeat(40))).unwrap();
    let issues = validate(&definition, &evaluator(), &limits()).unwrap_err().issues();
    assert_issue(&issues, "schedule.input", "nested 40 levels deep");
}

/// The API measures a start's input as MessagePack, and the scheduler starts each slot
/// through it: floats take 4 bytes of JSON each here and 9 of MessagePack, so 150,000 of
/// them fit a payload as JSON (600,000 bytes) and not as what a start carries.
#[test]
fn a_schedule_s_input_is_measured_as_the_api_measures_a_start_s() {
    let floats = vec![0.5; 150_000];
    let input = serde_json::to_value(&floats).unwrap();
    assert!(crate::limits::json_bytes(&input) < limits().payload_bytes_max);
    let bytes = crate::limits::msgpack_bytes(&input);
    assert!(bytes > limits().payload_bytes_max);
    let text = serde_json::json!({
        "name": "f",
        "schedule": {"every_ms": 60_000, "input": input},
        "steps": [{"kind": "transform", "id": "t", "output": "1"}],
    })
    .to_string();
    let definition = parse(&text);
    assert!(validate(&definition, &evaluator(), &limits()).is_ok(), "deployed before the rule, it still loads");
    let issues = check_new(&definition, &evaluator(), &limits()).unwrap_err().issues();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_issue(&issues, "schedule.input", &format!("is {bytes} bytes as MessagePack"));
}

#[test]
fn a_trigger_names_a_stream_and_maybe_a_subject() {
    let flow =
        |trigger: &str| format!("name: f\ntrigger: {trigger}\nsteps:\n  - {{ kind: task, id: a, pool: p, task: t }}\n");
    let plan =
        FlowPlan::compile(parse(&flow("{ stream: ORDERS, subject: 'orders.*.created' }")), 1, &evaluator(), &limits())
            .unwrap();
    let trigger = plan.definition.trigger.as_ref().expect("kept in the plan's definition");
    assert_eq!((trigger.stream.as_str(), trigger.subject.as_deref()), ("ORDERS", Some("orders.*.created")));
    assert!(validate(&parse(&flow("{ stream: ORDERS, subject: 'orders.>' }")), &evaluator(), &limits()).is_ok());

    assert_issue(&issues_of(&flow("{ stream: 'my.orders' }")), "trigger.stream", "is not a stream name");
    assert_issue(&issues_of(&flow("{ stream: '' }")), "trigger.stream", "is not a stream name");
    assert_issue(&issues_of(&flow("{ stream: S, subject: 'a..b' }")), "trigger.subject", "is not a subject");
    assert_issue(&issues_of(&flow("{ stream: S, subject: 'a.>.b' }")), "trigger.subject", "`>` only at the end");
    assert_issue(&issues_of(&flow("{ stream: S, subject: 'a.b*' }")), "trigger.subject", "is not a subject");
    assert!(parse_definition(&flow("{ stream: S, subjects: x }"), &limits()).is_err(), "unknown fields are errors");
}

#[test]
fn the_labels_of_a_schedule_or_a_trigger_are_checked_like_a_start_s() {
    let yaml = "name: f\nschedule: { every_ms: 60000, labels: { 'bad key': x } }\ntrigger: { stream: S, labels: { ok: y } }\nsteps:\n  - { kind: transform, id: t, output: '1' }\n";
    let issues = issues_of(yaml);
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_issue(&issues, "schedule.labels", "label key");
}

#[test]
fn an_input_schema_must_compile_and_a_schedule_s_input_must_match_it() {
    let schema = "input_schema:\n  type: object\n  required: [region]\n  properties: { region: { enum: [eu, us] } }\n";
    let flow =
        |schedule: &str| format!("name: f\n{schema}{schedule}steps:\n  - {{ kind: transform, id: t, output: '1' }}\n");
    let plan = FlowPlan::compile(parse(&flow("")), 1, &evaluator(), &limits()).expect("valid");
    let schema = plan.input_schema.as_ref().expect("compiled into the plan");
    assert!(schema.check(&serde_json::json!({"region": "eu"}), "input").is_empty());
    assert_eq!(schema.check(&serde_json::json!({"region": "mars"}), "input")[0].path, "input/region");

    let issues = issues_of(&flow("schedule: { every_ms: 60000, input: { region: mars } }\n"));
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_issue(&issues, "schedule.input/region", "is not one of");
    let issues = issues_of(&flow("schedule: { every_ms: 60000 }\n"));
    assert_issue(&issues, "schedule.input", "is not of type \"object\"");
    let valid = flow("schedule: { every_ms: 60000, input: { region: us } }\n");
    assert!(validate(&parse(&valid), &evaluator(), &limits()).is_ok());

    let bad = "name: f\ninput_schema: { type: strnig }\nsteps:\n  - { kind: transform, id: t, output: '1' }\n";
    assert_issue(&issues_of(bad), "input_schema", "not a JSON Schema this grid can use");
    let remote = "name: f\ninput_schema: { $ref: 'https://example.com/s.json' }\nsteps:\n  - { kind: transform, id: t, output: '1' }\n";
    assert_issue(&issues_of(remote), "input_schema", "is outside the schema, and nothing is fetched");
}

#[test]
fn a_concurrency_limit_is_at_least_one_and_its_key_reads_only_the_input() {
    let flow = |concurrency: &str| {
        format!("name: f\nconcurrency: {concurrency}\nsteps:\n  - {{ kind: transform, id: t, output: '1' }}\n")
    };
    assert_issue(&issues_of(&flow("{ max: 0 }")), "concurrency.max", "must be 1 to 100000");
    assert_issue(&issues_of(&flow("{ max: 100001 }")), "concurrency.max", "must be 1 to 100000");
    assert_issue(&issues_of(&flow("{ max: 2, key: 'steps.t.output' }")), "concurrency.key", "read the run's `input`");
    assert_issue(&issues_of(&flow("{ max: 2, key: 'input.' }")), "concurrency.key", "does not compile");
    assert!(parse_definition(&flow("{ max: 2, keys: x }"), &limits()).is_err(), "unknown fields are errors");

    let plan = FlowPlan::compile(parse(&flow("{ max: 2, key: 'input.customer' }")), 1, &evaluator(), &limits());
    let plan = plan.expect("valid");
    let concurrency = plan.concurrency.as_ref().expect("compiled");
    assert_eq!((concurrency.max, concurrency.rate), (Some(2), None));
    let key = |input| concurrency.key_of(&evaluator(), &input);
    assert_eq!(key(serde_json::json!({"customer": "acme"})), Ok("acme".to_owned()), "a string as it is");
    assert_eq!(key(serde_json::json!({"customer": 42})), Ok("42".to_owned()), "anything else as JSON");
    assert_eq!(key(serde_json::json!({})), Ok("null".to_owned()), "absent: one key for all such runs");
    let long = key(serde_json::json!({"customer": "x".repeat(300)})).unwrap_err();
    assert!(long.contains("gives 300 bytes for this input, over the limit of 256"), "{long}");
    let unkeyed = FlowPlan::compile(parse(&flow("{ max: 1 }")), 1, &evaluator(), &limits()).unwrap();
    assert_eq!(unkeyed.concurrency.as_ref().unwrap().key_of(&evaluator(), &serde_json::json!(7)), Ok(String::new()));
}

#[test]
fn a_start_rate_is_bounded_and_may_come_alone_or_with_a_max() {
    let flow = |concurrency: &str| {
        format!("name: f\nconcurrency: {concurrency}\nsteps:\n  - {{ kind: transform, id: t, output: '1' }}\n")
    };
    assert_issue(&issues_of(&flow("{ key: 'input.c' }")), "concurrency", "give `max` (runs at once), `rate`");
    assert_issue(
        &issues_of(&flow("{ rate: { runs: 0, per_ms: 1000 } }")),
        "concurrency.rate.runs",
        "must be 1 to 100000",
    );
    assert_issue(&issues_of(&flow("{ rate: { runs: 5, per_ms: 0 } }")), "concurrency.rate.per_ms", "must be 1 ms to");
    let too_long = flow("{ rate: { runs: 5, per_ms: 31622400001 } }");
    assert_issue(&issues_of(&too_long), "concurrency.rate.per_ms", "(366 days)");
    assert!(
        parse_definition(&flow("{ rate: { runs: 5, per: 1000 } }"), &limits()).is_err(),
        "unknown fields are errors"
    );

    let rate_only = FlowPlan::compile(parse(&flow("{ rate: { runs: 5, per_ms: 1000 } }")), 1, &evaluator(), &limits());
    let rate_only = rate_only.expect("valid");
    let concurrency = rate_only.concurrency.as_ref().expect("compiled");
    assert_eq!((concurrency.max, concurrency.rate), (None, Some(StartRate { runs: 5, per_ms: 1000 })));
    let both = flow("{ max: 3, rate: { runs: 5, per_ms: 1000 }, key: 'input.c' }");
    let both = FlowPlan::compile(parse(&both), 1, &evaluator(), &limits()).expect("valid");
    assert_eq!(both.concurrency.as_ref().map(|concurrency| concurrency.max), Some(Some(3)));
}

#[test]
fn a_full_limit_queues_by_default_and_cancels_the_oldest_only_under_a_max() {
    let flow = |concurrency: &str| {
        format!("name: f\nconcurrency: {concurrency}\nsteps:\n  - {{ kind: transform, id: t, output: '1' }}\n")
    };
    let when_full = |concurrency: &str| {
        let plan = FlowPlan::compile(parse(&flow(concurrency)), 1, &evaluator(), &limits()).expect("valid");
        plan.concurrency.as_ref().expect("compiled").when_full
    };
    assert_eq!(when_full("{ max: 1 }"), WhenFull::Queue);
    assert_eq!(when_full("{ max: 1, when_full: cancel_oldest }"), WhenFull::CancelOldest);
    assert_eq!(when_full("{ rate: { runs: 1, per_ms: 1000 }, when_full: cancel_new }"), WhenFull::CancelNew);
    let rate_only = flow("{ rate: { runs: 1, per_ms: 1000 }, when_full: cancel_oldest }");
    assert_issue(&issues_of(&rate_only), "concurrency.when_full", "give `max`");
    let message = parse_definition(&flow("{ max: 1, when_full: drop }"), &limits()).unwrap_err().to_string();
    assert!(message.contains("unknown variant `drop`"), "{message}");
}

#[test]
fn a_step_condition_compiles_and_reads_only_steps_before_it() {
    let flow = |when: &str| {
        format!(
            "name: f\nsteps:\n  - {{ kind: transform, id: a, output: '1' }}\n  - {{ kind: transform, id: b, after: [a], \
             output: '2', when: '{when}' }}\n"
        )
    };
    let plan = FlowPlan::compile(parse(&flow("steps.a.output == 1")), 1, &evaluator(), &limits()).unwrap();
    assert_eq!(plan.step(1).when.as_ref().map(|when| when.source.as_ref()), Some("steps.a.output == 1"));
    assert!(plan.step(0).when.is_none());
    assert_issue(&issues_of(&flow("1 +")), "steps[1](b).when", "does not compile");
    assert_issue(&issues_of(&flow("steps.b.output")), "steps[1](b).when", "its own step");
    let late = "name: f\nsteps:\n  - { kind: transform, id: a, output: '1', when: 'steps.b.output' }\n  - { kind: transform, id: b, output: '2' }\n";
    assert_issue(&issues_of(late), "steps[0](a).when", "does not run before a");
    // A step after the reader cannot be listed in its `after` (a cycle): the issue says so.
    let after = "name: f\nsteps:\n  - { kind: transform, id: a, output: 'steps.b.output' }\n  - { kind: transform, id: b, after: [a], output: '2' }\n";
    assert_issue(&issues_of(after), "steps[0](a).output", "which runs after a: read it in a step that comes after b");
}

#[test]
fn a_total_timeout_is_positive_and_compiles_for_tasks_and_maps() {
    let flow = |step: &str| format!("name: f\nsteps:\n  - {{ id: s, pool: p, task: t{step} }}\n");
    let compiled = |text: &str| FlowPlan::compile(parse(text), 1, &evaluator(), &limits()).expect("valid");
    let task = compiled(&flow(", kind: task, total_timeout_ms: 60000"));
    let PlanStepKind::Task(spec) = &task.step(0).kind else { panic!("a task step") };
    assert_eq!(spec.total_timeout_ms, Some(60_000));
    let map = compiled(&flow(", kind: map, items: 'input.xs', total_timeout_ms: 5000"));
    let PlanStepKind::Map { spec, .. } = &map.step(0).kind else { panic!("a map step") };
    assert_eq!(spec.total_timeout_ms, Some(5_000));
    assert_issue(
        &issues_of(&flow(", kind: task, total_timeout_ms: 0")),
        "steps[0](s).total_timeout_ms",
        "greater than 0",
    );
}

#[test]
fn a_cache_key_reads_the_task_input_and_its_ttl_is_bounded() {
    let flow = |step: &str| {
        format!("name: f\nsteps:\n  - {{ id: a, kind: transform, output: '1' }}\n  - {{ id: s, after: [a], pool: p, task: t{step} }}\n")
    };
    let compiled = |text: &str| FlowPlan::compile(parse(text), 1, &evaluator(), &limits()).expect("valid");
    let task = compiled(&flow(", kind: task, cache: { key: 'input.url', ttl_ms: 60000 }"));
    let PlanStepKind::Task(spec) = &task.step(1).kind else { panic!("a task step") };
    let cache = spec.cache.as_ref().expect("a cache");
    assert_eq!(cache.ttl_ms, 60_000);
    let key = cache.key_of(&evaluator(), &serde_json::json!({"url": "u1", "request": 7})).unwrap();
    assert_eq!(key, serde_json::json!("u1"));
    let map = compiled(&flow(", kind: map, items: 'input.xs', cache: { ttl_ms: 1 }"));
    let PlanStepKind::Map { spec, .. } = &map.step(1).kind else { panic!("a map step") };
    let whole = serde_json::json!({"x": 1});
    assert_eq!(spec.cache.as_ref().unwrap().key_of(&evaluator(), &whole).unwrap(), whole);
    let plain = compiled(&flow(", kind: task"));
    assert!(matches!(&plain.step(1).kind, PlanStepKind::Task(spec) if spec.cache.is_none()));
    assert_issue(&issues_of(&flow(", kind: task, cache: { ttl_ms: 0 }")), "steps[1](s).cache.ttl_ms", "from 1 ms");
    assert_issue(
        &issues_of(&flow(", kind: task, cache: { ttl_ms: 2592000001 }")),
        "steps[1](s).cache.ttl_ms",
        "30 days",
    );
    assert_issue(
        &issues_of(&flow(", kind: task, cache: { key: 'steps.a.output', ttl_ms: 5 }")),
        "steps[1](s).cache.key",
        "the task's input only",
    );
    assert_issue(
        &issues_of(&flow(", kind: task, cache: { key: '1 +', ttl_ms: 5 }")),
        "steps[1](s).cache.key",
        "does not compile",
    );
}

#[test]
fn a_failure_handler_is_another_flow_with_ends_to_start_on() {
    let flow = |on_failure: &str| {
        format!("name: f\non_failure: {on_failure}\nsteps:\n  - {{ id: a, kind: transform, output: '1' }}\n")
    };
    let plan = FlowPlan::compile(parse(&flow("{ flow: undo }")), 1, &evaluator(), &limits()).expect("valid");
    let handler = plan.on_failure.as_ref().expect("a handler");
    assert_eq!(handler.flow, "undo");
    assert_eq!(handler.statuses, vec![crate::FailureEnd::Failed, crate::FailureEnd::TimedOut]);
    assert!(handler.input.is_none());
    let custom = flow("{ flow: undo, input: '#{ why: result.error.code, a: steps.a.output }', statuses: [cancelled] }");
    let plan = FlowPlan::compile(parse(&custom), 1, &evaluator(), &limits()).expect("valid");
    let handler = plan.on_failure.as_ref().expect("a handler");
    assert_eq!((handler.statuses.as_slice(), handler.input.is_some()), (&[crate::FailureEnd::Cancelled][..], true));
    assert_issue(&issues_of(&flow("{ flow: f }")), "on_failure.flow", "names this flow");
    assert_issue(&issues_of(&flow("{ flow: 'a b' }")), "on_failure.flow", "flow name");
    assert_issue(&issues_of(&flow("{ flow: undo, statuses: [] }")), "on_failure.statuses", "is empty");
    assert_issue(&issues_of(&flow("{ flow: undo, input: 'steps.zz.output' }")), "on_failure.input", "does not exist");
    assert_issue(&issues_of(&flow("{ flow: undo, input: '1 +' }")), "on_failure.input", "does not compile");
}

fn new_issues_of(text: &str) -> Vec<Issue> {
    let definition = parse(text);
    validate(&definition, &evaluator(), &limits()).expect("valid under the rules a deployed version reloads with");
    match check_new(&definition, &evaluator(), &limits()) {
        Err(DefinitionError::Invalid(issues)) => issues,
        other => panic!("expected issues for a new deployment, got {other:?}"),
    }
}

/// A step whose id the expression language reserves cannot be read as `steps.<id>`: the
/// refusal of an expression that tries says to rename the step, not to use brackets (which
/// `steps` does not take).
#[test]
fn reading_a_step_whose_id_the_expression_language_reserves_says_to_rename_it() {
    for word in ["package", "match", "default", "go", "new", "null"] {
        let text = format!(
            "name: f\nsteps:\n  - {{ id: '{word}', kind: task, pool: p, task: t }}\n  - {{ id: b, kind: transform, \
             after: ['{word}'], output: 'steps.{word}.output' }}\n"
        );
        assert_issue(&issues_of(&text), "steps[1](b).output", &format!("give step `{word}` another id"));
    }
    // A field so named is read with brackets, as before.
    assert_issue(
        &issues_of("name: f\nsteps:\n  - { id: b, kind: transform, output: 'input.go' }\n"),
        "steps[0](b).output",
        "brackets",
    );
}

#[test]
fn a_new_deployment_may_not_list_the_choice_that_branches_to_a_step_in_its_after() {
    let issues = new_issues_of(
        r#"
name: routes
steps:
  - { id: route, kind: choice, choices: [{ when: 'input.x', next: a }], default: b }
  - { id: a, kind: task, pool: p, task: a, after: [route] }
  - { id: b, kind: transform, output: '1', after: [route] }
  - { id: risky, kind: task, pool: p, task: r, catch: [{ errors: ['*'], next: fallback }] }
  - { id: fallback, kind: transform, output: '2', after: [risky] }
"#,
    );
    assert_issue(&issues, "steps[1](a).after[0]", "branches to this step");
    assert_issue(&issues, "steps[2](b).after[0]", "branches to this step");
    // A catch target that lists the caught step also runs when it succeeds: allowed.
    assert_eq!(issues.len(), 2, "{issues:?}");
    assert!(new_rules(&parse(MEDIA_FLOW)).is_ok(), "implicit edges left implicit pass");
}

#[test]
fn a_new_deployment_may_not_wait_longer_than_366_days() {
    let issues = new_issues_of(
        r#"
name: patient
timeout_ms: 31622400001
steps:
  - id: t
    kind: task
    pool: p
    task: t
    timeout_ms: 31622400000
    retry: { max_attempts: 3, initial_backoff_ms: 18446744073709551615, max_backoff_ms: 18446744073709551615 }
  - { id: s, kind: signal, after: [t], timeout_ms: 99999999999999 }
"#,
    );
    let paths: Vec<&str> = issues.iter().map(|issue| issue.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "timeout_ms",
            "steps[0](t).retry.initial_backoff_ms",
            "steps[0](t).retry.max_backoff_ms",
            "steps[1](s).timeout_ms"
        ],
        "366 days itself is allowed: {issues:?}"
    );
    assert_issue(&issues, "timeout_ms", "366 days");
}

#[test]
fn a_new_trigger_names_a_stream_short_enough_for_its_runs_keys() {
    let triggered = |stream: &str| {
        format!("name: t\ntrigger: {{ stream: {stream} }}\nsteps:\n  - {{ id: a, kind: task, pool: p, task: a }}\n")
    };
    let issues = new_issues_of(&triggered(&"S".repeat(201)));
    assert_issue(&issues, "trigger.stream", "is 201 bytes, over the 200");
    assert!(new_rules(&parse(&triggered(&"S".repeat(200)))).is_ok());
    // The longest key its runs get fits an idempotency key.
    let key = format!("trigger/{}/{}/{}", "S".repeat(200), i128::from(i64::MAX), u64::MAX);
    assert!(key.len() <= 256, "{}", key.len());
}

#[test]
fn a_subflow_step_has_at_most_a_thousand_children_going() {
    let flow = |going: &str| {
        format!("name: fan\nsteps:\n  - {{ id: each, kind: subflow, flow: child, items: 'input.list'{going} }}\n")
    };
    let issues = new_issues_of(&flow(", max_concurrency: 1001"));
    assert_issue(&issues, "steps[0](each).max_concurrency", "over the 1000 child runs a step may have going");
    assert!(new_rules(&parse(&flow(", max_concurrency: 1000"))).is_ok());
    // The default, and a version deployed before the bound, go 1,000 at a time.
    for going in ["", ", max_concurrency: 5000"] {
        let plan = FlowPlan::compile(parse(&flow(going)), 1, &evaluator(), &limits()).expect("valid");
        let PlanStepKind::Subflow(SubflowSpec { items: Some(items), .. }) = &plan.step(0).kind else {
            panic!("a subflow step with items")
        };
        assert_eq!(items.max_concurrency, CHILDREN_GOING_MAX, "{going:?}");
    }
}

#[test]
fn a_map_step_has_at_most_ten_thousand_items_in_flight() {
    let flow = |going: &str| {
        format!("name: fan\nsteps:\n  - {{ id: each, kind: map, items: 'input.list', pool: p, task: t{going} }}\n")
    };
    let issues = new_issues_of(&flow(", max_concurrency: 10001"));
    assert_issue(&issues, "steps[0](each).max_concurrency", "over the 10000 items a map step may have in flight");
    assert!(new_rules(&parse(&flow(", max_concurrency: 10000"))).is_ok());
    // A deploy writes the default in; a version deployed before keeps what it ran with.
    let compiled = |definition| {
        let plan = FlowPlan::compile(definition, 1, &evaluator(), &limits()).expect("valid");
        let PlanStepKind::Map { max_concurrency, .. } = plan.step(0).kind else { panic!("a map step") };
        max_concurrency
    };
    assert_eq!(compiled(with_deploy_defaults(parse(&flow("")))), MAP_ITEMS_GOING_MAX);
    assert_eq!(compiled(with_deploy_defaults(parse(&flow(", max_concurrency: 8")))), 8);
    assert_eq!(compiled(parse(&flow(""))), 100_000, "deployed before: all its items");
    assert_eq!(compiled(parse(&flow(", max_concurrency: 50000"))), 50_000, "deployed before: as it said");
}

#[test]
fn a_run_has_at_most_five_thousand_children_going_over_its_subflow_steps() {
    let flow = |steps: usize, going: &str| {
        let mut yaml = "name: fan\nsteps:\n".to_owned();
        for n in 0..steps {
            yaml += &format!("  - {{ id: s{n}, kind: subflow, flow: child, items: 'input.list'{going} }}\n");
        }
        yaml + "  - { id: one, kind: subflow, flow: child }\n"
    };
    let issues = new_issues_of(&flow(5, ""));
    assert_issue(&issues, "steps", "may have 5001 child runs going at once");
    assert_issue(&issues, "steps", "over the 5000 a run may have");
    assert!(new_rules(&parse(&flow(5, ", max_concurrency: 999"))).is_ok());
    assert!(new_rules(&parse(&flow(4, ""))).is_ok());
    // A version deployed before the bound runs as it did: no share is taken from its steps.
    let plan = FlowPlan::compile(parse(&flow(6, "")), 1, &evaluator(), &limits()).expect("valid");
    let going: Vec<u32> = (0..6)
        .map(|index| match &plan.step(index).kind {
            PlanStepKind::Subflow(SubflowSpec { items: Some(items), .. }) => items.max_concurrency,
            other => panic!("a subflow step with items: {other:?}"),
        })
        .collect();
    assert_eq!(going, vec![1_000; 6]);
}
