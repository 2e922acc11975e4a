(component
  (core module $m
    (memory (export "memory") 1)
    (func (export "f") (result i32) i32.const 42))
  (core instance $i (instantiate $m))
  (func $f (result u32) (canon lift (core func $i "f")))
  (export "info" (func $f)))
