;; A task that imports `host` and logs from info(): the linker provides the
;; import, info() calls it, then answers `logger` 0.1.0-rc.1 with schemas.
(component
  (import "trellis:plugin/types@0.1.0" (instance $types
    (type $sc (record (field "run-id" string) (field "workflow" string) (field "step-id" string) (field "attempt" u32)))
    (export "step-context" (type (eq $sc)))
    (type $te (record (field "message" string) (field "retryable" bool) (field "details" (option string))))
    (export "task-error" (type (eq $te)))
    (type $pi (record (field "name" string) (field "version" string) (field "description" string) (field "input-schema" (option string)) (field "output-schema" (option string))))
    (export "plugin-info" (type (eq $pi)))))
  (import "trellis:plugin/host@0.1.0" (instance $host
    (type $level (enum "trace" "debug" "info" "warn" "error"))
    (export "log-level" (type $l (eq $level)))
    (export "log" (func (param "level" $l) (param "message" string)))))
  (alias export $types "step-context" (type $step-context))
  (alias export $types "task-error" (type $task-error))
  (alias export $types "plugin-info" (type $plugin-info))
  (alias export $host "log" (func $log))
  (core module $mem-module
    (memory (export "memory") 1))
  (core instance $mem-instance (instantiate $mem-module))
  (alias core export $mem-instance "memory" (core memory $mem))
  (core func $log-lowered (canon lower (func $log) (memory $mem)))
  (core instance $imports (export "log" (func $log-lowered)))
  (core module $m
    (import "host" "log" (func $log (param i32 i32 i32)))
    (import "env" "memory" (memory 1))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 4096)
    (func (export "info") (result i32)
      i32.const 2
      i32.const 300
      i32.const 5
      call $log
      i32.const 0)
    (func (export "run") (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
      ;; result::err(task-error { message: "no", retryable: true, details: none })
      i32.const 64)
    (data (i32.const 0) "\c8\00\00\00\06\00\00\00\d2\00\00\00\0a\00\00\00\dc\00\00\00\00\00\00\00\01\00\00\00\f0\00\00\00\02\00\00\00\01\00\00\00\f0\00\00\00\02\00\00\00")
    (data (i32.const 64) "\01\00\00\00\e6\00\00\00\02\00\00\00\01\00\00\00\00\00\00\00")
    (data (i32.const 200) "logger")
    (data (i32.const 210) "0.1.0-rc.1")
    (data (i32.const 230) "no")
    (data (i32.const 240) "{}")
    (data (i32.const 300) "hello"))
  (core instance $env (export "memory" (memory $mem)))
  (core instance $i (instantiate $m (with "host" (instance $imports)) (with "env" (instance $env))))
  (alias core export $i "realloc" (core func $realloc))
  (func $info (result $plugin-info) (canon lift (core func $i "info") (memory $mem)))
  (func $run (param "ctx" $step-context) (param "input" string) (result (result string (error $task-error)))
    (canon lift (core func $i "run") (memory $mem) (realloc $realloc)))
  (export "info" (func $info))
  (export "run" (func $run)))
