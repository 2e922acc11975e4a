(component
  (import "example:missing/thing@1.0.0" (instance
    (export "f" (func (result u32)))))
)
