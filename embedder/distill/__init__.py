"""Distillation from a teacher embedder: the teacher pass (`teacher.run_teacher`, the `teacher`
command) and the signals store the training pipeline joins (`signals.TeacherSignals`)."""
