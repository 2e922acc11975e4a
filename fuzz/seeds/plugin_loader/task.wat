;; The smallest component of the trellis:plugin/task world: info() answers
;; `fuzz` 1.0.0, run() answers `null`.
(component
  (import "trellis:plugin/types@0.1.0" (instance $types
    (type $sc (record (field "run-id" string) (field "workflow" string) (field "step-id" string) (field "attempt" u32)))
    (export "step-context" (type (eq $sc)))
    (type $te (record (field "message" string) (field "retryable" bool) (field "details" (option string))))
    (export "task-error" (type (eq $te)))
    (type $pi (record (field "name" string) (field "version" string) (field "description" string) (field "input-schema" (option string)) (field "output-schema" (option string))))
    (export "plugin-info" (type (eq $pi)))))
  (alias export $types "step-context" (type $step-context))
  (alias export $types "task-error" (type $task-error))
  (alias export $types "plugin-info" (type $plugin-info))
  (core module $m
    (memory (export "memory") 1)
    (global $bump (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      global.get $bump
      local.set $p
      global.get $bump
      local.get 3
      i32.add
      i32.const 7
      i32.add
      i32.const -8
      i32.and
      global.set $bump
      local.get $p)
    (func (export "info") (result i32) i32.const 0)
    (func (export "run") (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32) i32.const 64)
    ;; plugin-info: name, version, description, two `none`s
    (data (i32.const 0) "\c8\00\00\00\04\00\00\00\d2\00\00\00\05\00\00\00\dc\00\00\00\00\00\00\00")
    ;; result::ok("null")
    (data (i32.const 64) "\00\00\00\00\e6\00\00\00\04\00\00\00")
    (data (i32.const 200) "fuzz")
    (data (i32.const 210) "1.0.0")
    (data (i32.const 230) "null"))
  (core instance $i (instantiate $m))
  (alias core export $i "memory" (core memory $mem))
  (alias core export $i "realloc" (core func $realloc))
  (func $info (result $plugin-info) (canon lift (core func $i "info") (memory $mem)))
  (func $run (param "ctx" $step-context) (param "input" string) (result (result string (error $task-error)))
    (canon lift (core func $i "run") (memory $mem) (realloc $realloc)))
  (export "info" (func $info))
  (export "run" (func $run)))
