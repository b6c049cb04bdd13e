"""Models leaving the project: prediction on new image files, deadlines in time, exported programs and a server.
Imports the evaluation layer and those below it; nothing here trains.
"""
