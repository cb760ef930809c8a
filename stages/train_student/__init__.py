"""llavadi train-student: stream the teacher cache and train the student."""
