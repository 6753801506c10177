// Placeholder so the target builds; replaced by the qcow2 implementation.
enum QCow2Placeholder {}
