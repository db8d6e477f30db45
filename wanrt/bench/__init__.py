"""`wanrt bench`: scenarios measured side by side, with reports and plots."""
