// Placeholder so the target builds.
enum HotImagerPlaceholder {}
